"""Sample quality (`python -m terdit.evaluate`): FID with the standard Inception network (fid),
class accuracy under a small Fashion-MNIST classifier (classifier), and the command line (cli)."""
from .evaluate_cli import build_parser, evaluate_images, main

__all__ = ["build_parser", "evaluate_images", "main"]
