"""Models: a model spec (tag, file, URI) to encoders and the model's own preprocessing; cached class vectors."""
