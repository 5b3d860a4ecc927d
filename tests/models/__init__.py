"""A real base/fine-tuned model pair for quality benchmarks, built offline from shipped packages."""
