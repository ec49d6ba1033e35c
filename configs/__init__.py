"""ml_collections config files, one per model family; load with --config=configs/<file>.py."""
