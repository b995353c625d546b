"""ich_prep: compile RSNA head-CT DICOMs into WebDataset shards with a Parquet index."""

__version__ = "0.1.0"

# Bump on any change a reader must know about; readers accept the same major version.
FORMAT_VERSION = "2.0"

# Fixed label order used everywhere: shards, index, metric, submission.
LABELS = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
