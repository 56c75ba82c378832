"""VOC-format datasets (real and synthetic), their transforms and loaders."""
