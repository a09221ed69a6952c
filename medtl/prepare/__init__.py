"""The preprocess stage: data/ingested/ -> data/prepared/, and the one path from decoded pixels to the model's input."""
