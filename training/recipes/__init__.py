"""Recipes for the shipped adapters; ``python -m training.recipes.make_all`` retrains them."""
