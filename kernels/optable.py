"""The sampler-step updates as data: the one table that the step kernels, their tests and the benchmarks read.

ALGORITHMS §2: every update is an affine combination sum_k a_k t_k of same-shaped tensors, plus
c_z z for the noisy ones. Plain Python (no torch, no triton), so that any step backend can use it.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepOp", "OPS", "op"]


@dataclass(frozen=True)
class StepOp:
    """One update of `wgfcore.ops`, as every backend and test reads it.

    name: the update's name, the key of `OPS` and of the sampler's coefficient tables.
    tensors: the tensor inputs, in call order (the public launchers' and the oracle's order).
    columns: the coefficients in call order: the public launcher's coefficient arguments, and the
        columns of the sampler's (N, len(columns)) coefficient table for this update.
    scales: per tensor, the column that scales it, or a constant (project's x_pred enters with 1).
    noise: the column that scales the Gaussian z, or None when the update has no noise term.
    checked: index in `tensors` of the network output that the sampling loop's kernel checks
        for NaN/inf (s in predict/em, T in project, s' in heun: its s went through predict).
    oracle: the function of `wgfcore.ops` that this update mirrors; it takes the tensors, then z
        when `noise` is set, then the columns.

    The sum is formed in fp32 as ((a_0 t_0 + a_1 t_1) + a_2 t_2) + a_3 t_3, then + c_z z, and
    rounded once to the storage dtype: the order of `wgfcore.ops`.
    """

    name: str
    tensors: tuple[str, ...]
    columns: tuple[str, ...]
    scales: tuple[str | float, ...]
    noise: str | None
    checked: int
    oracle: str

    @property
    def nt(self) -> int:
        """Number of tensor inputs (2 or 4)."""
        return len(self.tensors)

    @property
    def ncol(self) -> int:
        """Number of coefficients: the width of the sampler's table for this update."""
        return len(self.columns)

    def kernel_columns(self) -> tuple[int | float, ...]:
        """The kernels' (NT + 1)-wide coefficient row, as a function of a table row: entry k is the
        index of the table column that scales tensor k (k < NT) or the noise (k = NT), or a constant
        (1.0 for project's x_pred, 0.0 for the noise of an update without one)."""
        idx = {c: i for i, c in enumerate(self.columns)}
        row = [idx[s] if isinstance(s, str) else float(s) for s in self.scales]
        row.append(idx[self.noise] if self.noise is not None else 0.0)
        return tuple(row)

    def kernel_row(self, row) -> tuple:
        """A table row (sequence of `ncol` values) as the kernels' NT + 1 coefficients."""
        if len(row) != self.ncol:
            raise ValueError(f"{self.name}: a table row has {self.ncol} columns ({', '.join(self.columns)}), "
                             f"got {len(row)}")
        return tuple(row[k] if isinstance(k, int) else k for k in self.kernel_columns())

    def bytes_per_element(self, explicit_z: bool = False) -> int:
        """Minimum traffic per element, in storage-element sizes: each input read once, the output
        written once; in-kernel noise reads nothing, an explicit z is one more input."""
        return self.nt + 1 + (1 if explicit_z and self.noise is not None else 0)


OPS: dict[str, StepOp] = {o.name: o for o in (
    StepOp("predict", ("x", "s"), ("c_x", "c_s"), ("c_x", "c_s"), None, 1, "predict"),
    StepOp("em", ("x", "s"), ("c_x", "c_s", "c_z"), ("c_x", "c_s"), "c_z", 1, "em_step"),
    StepOp("project", ("x_pred", "T"), ("c_T", "c_z"), (1.0, "c_T"), "c_z", 1, "project"),
    StepOp("heun", ("x", "s", "x_p", "s_p"), ("c_x", "c_s", "c_xp", "c_sp"), ("c_x", "c_s", "c_xp", "c_sp"),
           None, 3, "heun_correct"),
)}


def op(name: str) -> StepOp:
    """The update called `name`, or a ValueError that lists the known ones."""
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown step update {name!r}; known: {sorted(OPS)}") from None
