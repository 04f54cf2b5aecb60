"""httpx without its command-line client: import ``httpx`` from here.

httpx imports its command-line client when it is imported (``httpx._main``: rich, click and
pygments), about half of its import time, on the path of every command that asks a cloud's API
(`lenslab status` included). lenslab never runs that client. Marked missing here, before httpx
is first imported, it is skipped: httpx expects that ImportError and defines a stand-in
``main``; the rest of httpx is unchanged.
"""

import sys

sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

import httpx  # noqa: E402  (after the line above, which is the point)

__all__ = ["httpx"]
