"""Training checkpoints with orbax: every N steps and at the end, keep K, resume the latest.

A checkpoint holds the trainable tree, the optimizer state, the EMA (if any), the step and
the data position (epoch, step within the epoch) — never the frozen base weights, which are
re-read from the model folder on resume, so a LoRA checkpoint is a few MB, not GBs. orbax
writes into a temporary folder and renames it when complete, so a run killed mid-save
resumes from the previous checkpoint, never from a half-written one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        return self._mngr.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore onto ``abstract_state``'s shapes, dtypes and shardings."""
        try:
            out = self._mngr.restore(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:
            raise RuntimeError(
                f"{self.directory}/{step}: could not restore this checkpoint onto the model "
                f"and strategy of the current config ({type(err).__name__}: {err}). Was it "
                "written by a run with another strategy or model? Use a fresh --workdir or "
                "the config that wrote it."
            ) from err
        return out["state"], dict(out["data"])

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, as a restore target."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
