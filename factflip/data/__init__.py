from factflip.data.loaders import load_facts

__all__ = ["load_facts"]
