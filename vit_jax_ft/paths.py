"""One test of where a path lives: on this machine, behind a URL, or on a gfile filesystem."""
import re

_SCHEME = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


def is_remote(path: str) -> bool:
  """Whether `path` has a scheme (`gs://`, `ram://`, `https://`): not a local file name."""
  return bool(_SCHEME.match(path))


def is_url(path: str) -> bool:
  """Whether `path` is fetched over HTTP(S) rather than through gfile."""
  return path.startswith(('http://', 'https://'))
