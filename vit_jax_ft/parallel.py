"""Data parallelism over every device of every host: one mesh axis, batches split along it."""
import collections
import itertools
import math
from typing import Any, Dict, Iterable, Iterator, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def create_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters and optimiser state: a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding of batches: the leading axis split over the data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, name: str, accum_steps: int = 1,
                     process_count: Optional[int] = None) -> int:
  """This process's share of `config.<name>`, which must split over processes and devices.

  With `accum_steps`, every device's part must also split into that many micro-batches.
  """
  process_count = jax.process_count() if process_count is None else process_count
  multiple = math.lcm(process_count, jax.device_count() * accum_steps)
  if global_batch <= 0 or global_batch % multiple:
    micro = f' x config.accum_steps={accum_steps}' if accum_steps > 1 else ''
    raise ValueError(f'config.{name}={global_batch} must be a positive multiple of {multiple}, '
                     f'to split over the {process_count} processes and the '
                     f'{jax.device_count()} devices{micro}; choose a multiple.')
  return global_batch // process_count


def to_global(mesh: Mesh, local_batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
  """Assembles each host's part of a batch into global arrays sharded over the mesh."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def prefetch_to_mesh(mesh: Mesh, batches: Iterable[Dict[str, np.ndarray]],
                     size: int) -> Iterator[Dict[str, jax.Array]]:
  """Places up to `size` batches on the devices ahead of their use (transfers are async)."""
  queue: collections.deque = collections.deque()
  iterator = iter(batches)
  for batch in itertools.islice(iterator, max(size, 1)):
    queue.append(to_global(mesh, batch))
  while queue:
    yield queue.popleft()
    for batch in itertools.islice(iterator, 1):
      queue.append(to_global(mesh, batch))


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Puts a host-side tree on every device."""
  return jax.device_put(tree, replicated(mesh))
