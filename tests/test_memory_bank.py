"""MemoryBankObjective options: None means the defaults, a dict is read into the dataclass."""

from __future__ import annotations

import pytest

from bioaudio.errors import ConfigError
from bioaudio.models.audio_model import build_model
from bioaudio.training.memory_bank import MemoryBankConfig, MemoryBankObjective


def test_options_default_dict_and_dataclass():
    model = build_model("eat", encoder="tiny")
    assert MemoryBankObjective(model).cfg == MemoryBankConfig()
    obj = MemoryBankObjective(model, {"temperature": 0.2, "proj_dim": 32})
    assert isinstance(obj.cfg, MemoryBankConfig)
    assert (obj.cfg.temperature, obj.cfg.proj_dim) == (0.2, 32)
    assert MemoryBankObjective(model, MemoryBankConfig(queue_size=64)).cfg.queue_size == 64
    with pytest.raises(ConfigError):
        MemoryBankObjective(model, {"no_such_option": 1})
