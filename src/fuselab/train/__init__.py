"""Training: configs, the Fabric loop and one run from a resolved config."""
