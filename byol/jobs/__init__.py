"""Jobs: the only code that reads the config (building objects, run folders, pretrain and evaluate)."""
