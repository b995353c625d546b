"""ich_train: stream ich-prep shards into timm classifiers, score with the RSNA 2019 metric, write submissions."""
