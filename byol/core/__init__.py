"""The method in plain PyTorch: backbone and taps, heads, loss, EMA, model, augmentation, optimizers,
data tensors, features, kNN, linear probe, checkpoint files. Imports torch, torchvision, numpy and PIL only."""
