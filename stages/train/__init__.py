"""Stage two: stream cache shards into a memory-lean divergence loss and train the student."""
