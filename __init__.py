"""kd: knowledge distillation around a cached, compressed teacher top-k logit store.

Data flows one way (see README.md):
dataset -> ``kd.stages.generate`` -> ``kd.storage`` (shards) -> loader ->
``kd.stages.train`` (losses) -> checkpoint -> refresh -> ``kd.stages.generate``.
"""

__version__ = "0.1.0"
