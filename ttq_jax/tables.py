"""The results tables' README blocks: each generated table stands in README.md between `<!-- NAME:start -->` and
`<!-- NAME:end -->`, and a test compares the block with the table its results file makes (`experiments/`)."""

from __future__ import annotations


def markers(name: str) -> tuple[str, str]:
  return f'<!-- {name}:start -->', f'<!-- {name}:end -->'


def readme_block(readme: str, name: str) -> str:
  """The generated table `name` as it stands in `readme` (between its markers)."""
  start, end = markers(name)
  return readme[readme.index(start) + len(start):readme.index(end)].strip('\n')


def with_readme_block(readme: str, name: str, body: str) -> str:
  """`readme` with the block `name` replaced by `body`."""
  start, end = markers(name)
  return readme[:readme.index(start) + len(start)] + '\n' + body.strip('\n') + '\n' + readme[readme.index(end):]
