"""Reading and writing: Hugging Face directories, GGUF files, run checkpoints, atomic files, wheel fetches."""
