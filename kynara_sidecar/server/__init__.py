"""Front doors that translate wire formats into the decision pipeline."""

__all__: list[str] = []
