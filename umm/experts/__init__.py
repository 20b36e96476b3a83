"""Small real models made locally: random Llama checkpoints (tests, benches) and the tiny
trained expert suite (demos, end-to-end tests). No model hub is needed."""
