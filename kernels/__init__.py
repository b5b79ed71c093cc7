"""Triton kernels. Each file holds the kernel(s), an autograd Function and a plain-PyTorch reference."""

import os


def _patch_interpreter_loop_bounds() -> None:
    """Let Triton 3.6's CPU interpreter (TRITON_INTERPRET=1) use runtime loop bounds under NumPy >= 2.4.

    The interpreter stores scalars as 1-element arrays and `range()` calls int() on them, which NumPy 2.4
    refuses (triton-lang/triton#9171, fixed upstream in #9172, after 3.6). Compiled GPU kernels never pass
    through here; only the interpreter's tensor class gains an `__index__`.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "treadle_index_fix", False):
        return

    def patch(tensor: type, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch.treadle_index_fix = True
    interpreter._patch_lang_tensor = patch


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_loop_bounds()
