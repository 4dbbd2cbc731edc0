"""kvbm package."""
