"""Data: every file an experiment reads, as uniform rows whatever format it came in.

- `schema`: the row shapes (preference pairs, warm-up examples, POPE questions, MileBench samples), POPE's
  split names and `DataFormatError`, the one error for bad input.
- `formats`: readers of the real file formats (HA-DPO, Visual Genome, COCO, POPE, MileBench, preference
  tables); bad input names its file, record and field.
- `datasets`: the datasets a config names, as Ray Data datasets, with rows whose images do not open set
  aside and counted.
- `synthetic`: a small deterministic world written in the real formats (the demo's and the tests' data).
- `pope_builder`: POPE question sets (random, popular, adversarial) from object annotations.
"""
