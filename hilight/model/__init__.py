"""HiLight model components."""

from hilight.model.hilight import COMPONENTS, HiLight, TowerOutputs

__all__ = ["COMPONENTS", "HiLight", "TowerOutputs"]
