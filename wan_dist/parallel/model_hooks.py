"""What a parallelization or cache installs on a model: forward hooks and attention processors, kept so
that the model can be given back exactly as it was."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle


@dataclass
class ModelHooks:
    hooks: list[RemovableHandle] = field(default_factory=list)
    processors: list[tuple[torch.nn.Module, object]] = field(default_factory=list)

    def set_processor(self, module: torch.nn.Module, processor: object) -> None:
        """Install `processor` on an attention module, remembering the one it replaces."""
        self.processors.append((module, module.processor))
        module.set_processor(processor)

    def remove(self) -> None:
        """Remove the hooks and restore the original processors (as they were: a backend set on the model
        meanwhile is not carried over to them)."""
        for hook in self.hooks:
            hook.remove()
        for module, processor in self.processors:
            module.set_processor(processor)
        self.hooks.clear()
        self.processors.clear()
