"""Stage one: sample completions, score them with the teacher, write cache shards."""
