"""grain access to a finished sharded dataset (pairs, latents): a random-access source and a
MapDataset.

Element i of `ShardSource(folder)` is record i, a dict of numpy arrays and scalars: for pairs
{"index", "seed", "prompt", "z", "x", ...}, for a latent cache {"index", "latent", "label" or
"caption", "key"} (whatever the stage stored; see the manifest's "record"). Per-host sharding,
shuffling, batching and a checkpointable iterator come from grain:

  ds = shard_dataset(folder, batch_size=64, seed=0)       # this host's share
  it = iter(ds.to_iter_dataset())
  batch = next(it); state = it.get_state()                 # save with the train state
  it.set_state(state)                                      # resume exactly there
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from typing import Any, Sequence, SupportsIndex

import grain

from d2g_jax.data import shards as fmt


@dataclasses.dataclass(frozen=True)
class _FileInstruction:
  """array_record's FileInstruction protocol: the reader skips counting records."""
  filename: str
  skip: int
  take: int
  examples_in_shard: int


class ShardSource:
  """grain RandomAccessDataSource over the shards of a complete dataset (any `shards.LAYOUTS`).

  Opening checks the manifest (format, completeness, contiguous indices) and each
  shard file with `verify` ("none", "size": catches truncation, "sha256": reads every
  file). Reads that hit a corrupt chunk raise ShardError naming the shard.
  """

  def __init__(self, folder: str, *, verify: str = "size"):
    self.folder = folder
    self.manifest = m = fmt.read_manifest(folder, layout=None)
    self.layout = layout = fmt.LAYOUTS[m["format"]]
    path = os.path.join(folder, fmt.MANIFEST)
    if m["status"] != "complete":
      raise fmt.ShardError(f"{path}: the {layout.prefix} dataset is not complete (status "
                           f"{m['status']!r}); run the {layout.stage} stage again with the same "
                           "command to finish it")
    infos = m["shards"]
    expected = 0
    for info in infos:
      if info["first_index"] != expected:
        raise fmt.ShardError(f"{path}: shard {info['name']} starts at {layout.unit} "
                             f"{info['first_index']}, expected {expected}; the manifest is "
                             "inconsistent")
      expected += info["num_records"]
    if expected != m["num_examples"] or len(infos) != m["num_shards"]:
      raise fmt.ShardError(f"{path}: {len(infos)} shards with {expected} {layout.unit}s; the "
                           f"manifest announces {m['num_shards']} shards with "
                           f"{m['num_examples']}")
    for info in infos:
      fmt.check_shard(folder, info, verify, layout)
    self._paths = [os.path.join(folder, i["name"]) for i in infos]
    self._starts = [i["first_index"] for i in infos]
    self._source = grain.sources.ArrayRecordDataSource([
        _FileInstruction(p, 0, i["num_records"], i["num_records"])
        for p, i in zip(self._paths, infos)])

  def __len__(self) -> int:
    return len(self._source)

  def _shard_of(self, key: int) -> str:
    return self._paths[bisect.bisect_right(self._starts, key) - 1]

  def _decode(self, key: int, data: bytes) -> dict[str, Any]:
    try:
      record = fmt.decode_record(data)
    except Exception as e:  # msgpack errors have no common base class
      raise fmt.ShardError(f"{self.layout.unit} {key} in shard {self._shard_of(key)} does not "
                           f"decode: {e}") from e
    if record.get("index") != key:
      raise fmt.ShardError(f"shard {self._shard_of(key)} holds {self.layout.unit} "
                           f"{record.get('index')} where {self.layout.unit} {key} belongs")
    return record

  def __getitem__(self, key: SupportsIndex) -> dict[str, Any]:
    key = key.__index__()
    try:
      data = self._source[key]
    except RuntimeError as e:  # riegeli: truncated file, chunk hash mismatch, ...
      raise fmt.ShardError(f"reading {self.layout.unit} {key} from shard {self._shard_of(key)} "
                           f"failed: {e}. The shard is corrupt: delete it and its .json sidecar, "
                           f"then run the {self.layout.stage} stage again.") from e
    return self._decode(key, data)

  def __getitems__(self, keys: Sequence[SupportsIndex]) -> list[dict[str, Any]]:
    keys = [k.__index__() for k in keys]
    try:
      data = self._source.__getitems__(keys)
    except RuntimeError:
      return [self[k] for k in keys]  # read one by one to name the broken shard
    return [self._decode(k, d) for k, d in zip(keys, data)]

  def __repr__(self) -> str:
    return (f"ShardSource({self.folder!r}, {len(self)} {self.layout.unit}s in "
            f"{len(self._paths)} shards)")


PairSource = ShardSource  # the name the pair stage's users know


def shard_dataset(folder: str, *, batch_size: int | None = None, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 drop_remainder: bool = True, verify: str = "size") -> grain.MapDataset:
  """This host's records: shuffled globally (a new order each epoch), then split over hosts.

  `batch_size` is per host. Batched, host h's i-th batch is rows [h*b, (h+1)*b) of the
  i-th global batch of b * process_count records, so the global batch (the hosts' rows in
  process order, `parallel.host_to_global`) is the same records in the same order whatever
  the number of hosts. `num_epochs=None` repeats forever. Host defaults come from
  `jax.process_index()` / `jax.process_count()`.
  """
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  ds = grain.MapDataset.source(ShardSource(folder, verify=verify))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if batch_size:  # consecutive blocks of batch_size, every process_count-th one is ours
    return ds.batch(batch_size, drop_remainder=drop_remainder)[process_index::process_count]
  return ds[process_index::process_count]


pair_dataset = shard_dataset


def verify_shards(folder: str) -> dict[str, Any]:
  """Full check of a dataset: every shard's sha256, every record decoded in order.

  Returns the manifest; raises ShardError naming the first bad shard.
  """
  source = ShardSource(folder, verify="sha256")
  for start in range(0, len(source), 256):
    source.__getitems__(range(start, min(start + 256, len(source))))
  return source.manifest


verify_pairs = verify_shards
