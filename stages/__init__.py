"""The two stages of kd: ``generate`` (samples + teacher top-k into a cache) and
``train`` (stream a cache into a divergence loss). Shared model loading lives in
``kd.stages.models``."""
