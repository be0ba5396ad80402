"""The kuiper-plugins command-line client."""
