"""What the tests share beyond fixtures: small random models and checkpoints (`models`), test inputs
(`media`) and what the deployment tests need to start and stop processes (`deploy`).

Fixtures and hooks live in the conftest files; tests import helpers from here, never from a conftest.
A real mone-serve process for end-to-end tests is in tests/live_server.py, and the rule for missing system
packages in tests/system.py.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
