"""A Triton kernel that cannot be built: each launch raises what Triton raises on a machine it cannot build for."""


class UnbuildableKernel:
    """Stands in for a `@triton.jit` function: `kernel[grid](...)` raises `error`; `launches` counts the tries."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error

        return launch
