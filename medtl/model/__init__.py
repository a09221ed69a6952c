"""The network and its files: backbones, starting weights, the classifier, models/backbone.pt and models/model.pt, inference."""
