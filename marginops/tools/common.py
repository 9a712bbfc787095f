"""What the tools share: the margins a command line names, and the --help formatting."""

from __future__ import annotations

import argparse
from typing import Callable, Dict, Optional

from .. import margins as M

# The margins a command line can name (train --margin, bench --margins): name -> a factory of the
# spec at its face-recognition defaults.
MARGINS: Dict[str, Callable[[], M.Margin]] = {
    "softmax": M.Softmax,
    "normface": M.NormFace,
    "sphereface": M.SphereFace,
    "cosface": M.CosFace,
    "arcface": M.ArcFace,
    "combined": lambda: M.CombinedMargin(s=64.0, m1=1.0, m2=0.3, m3=0.2),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (line breaks kept), and every option's default after its help:
    argparse's "(default: ...)", unless the help states the default itself (defaults that
    depend on the device)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def plain(doc: Optional[str]) -> str:
    """A docstring as --help shows it: plain text, without reStructuredText ``literals``."""
    return (doc or "").replace("``", "").replace(":func:", "").replace(":class:", "")
