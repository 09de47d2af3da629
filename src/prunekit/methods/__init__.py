"""One file per pruning method; each registers one config class and one pure function."""
