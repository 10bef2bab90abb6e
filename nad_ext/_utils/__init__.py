"""Helpers every part of nad_ext may use, and that know nothing about NAD.

- :mod:`~nad_ext._utils.storage`: atomic file writes with readable errors, and safetensors files
  whose tensors carry CRC-32 checksums (mask banks, zoo caches, shards are written through it);
- :mod:`~nad_ext._utils.faults`: fault injection for crash tests (``NAD_FAULT``);
- :mod:`~nad_ext._utils.progress`: progress bars that suit where they go (terminal or log).

May import: nothing of nad_ext but each other (storage uses faults). Private to nad_ext (the
leading underscore): not an API for users, importable from every module of the package.
"""
