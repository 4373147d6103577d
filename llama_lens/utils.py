"""TransformerLens' small helpers under their own names (`ll.utils.*`): `get_act_name`, `test_prompt`, position
slices, and `ungroup_kv` for grouped-query attention. A face: the helpers live in model/hook_names.py and
lens/prompt.py.
"""

from .lens.prompt import test_prompt
from .model.hook_names import PosSlice, apply_pos_slice, get_act_name, ungroup_kv

__all__ = ["PosSlice", "apply_pos_slice", "get_act_name", "test_prompt", "ungroup_kv"]
