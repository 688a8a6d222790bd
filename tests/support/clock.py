"""A wall clock of its own for a process under test: tests/support/clockshift.c, preloaded.

The shift is read from a file the test writes, so it can step mid-run; the monotonic clock,
the files' stamps and containerd's clock stay true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("clockshift.c")


class ClockShift:
    def __init__(self, folder: Path) -> None:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise FileNotFoundError("no C compiler (apt-get install gcc libc6-dev) to build the clock shim")
        self.library = folder / "clockshift.so"
        self.file = folder / "clock-shift"
        argv = [cc, "-shared", "-fPIC", "-O2", "-o", str(self.library), str(SOURCE), "-ldl"]
        subprocess.run(argv, check=True, capture_output=True)
        self.set(0)

    @property
    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.library), "OBR_CLOCK_SHIFT_FILE": str(self.file)}

    def set(self, seconds: float) -> None:
        """The process's wall clock is ``seconds`` ahead of the true one from now on (within 50 ms)."""
        tmp = self.file.with_suffix(".new")
        tmp.write_text(f"{seconds:.3f}\n")
        os.replace(tmp, self.file)
