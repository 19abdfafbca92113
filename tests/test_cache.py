"""sqz.AdapterCache: many adapters held compressed, the recently used ones decoded, under concurrent requests."""
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file

import sqz


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Twelve small distinct adapters as .sqz files, and what sqz.load_file gives for each."""
    root = tmp_path_factory.mktemp("catalog")
    paths, expected = {}, {}
    for i in range(12):
        g = torch.Generator().manual_seed(i)
        tensors = {f"base_model.model.l{j}.q.lora_A.weight": torch.randn(4, 64, generator=g).half() for j in range(3)}
        tensors.update({f"base_model.model.l{j}.q.lora_B.weight": torch.randn(48, 4, generator=g).half() for j in range(3)})
        save_file(tensors, str(root / f"{i}.safetensors"))
        paths[f"a{i}"] = root / f"{i}.sqz"
        sqz.encode(root / f"{i}.safetensors", paths[f"a{i}"], sqz.EncodeOptions(bits=2))
        expected[f"a{i}"] = sqz.load_file(paths[f"a{i}"])
    return paths, expected


def test_eight_threads_with_eviction_get_exactly_what_load_file_gives(catalog):
    paths, expected = catalog
    cache = sqz.AdapterCache(max_decoded=3)
    for name, path in paths.items():
        cache.add(name, path.read_bytes() if name.endswith(("0", "2", "4")) else path)
    rng = random.Random(7)
    requests = [f"a{min(int(rng.paretovariate(1.0)) - 1, 11)}" for _ in range(400)]  # Zipf-like: a0 most asked

    def ask(name):
        got = cache.get(name)
        return name, all(torch.equal(got[k], v) for k, v in expected[name].items()) and got.keys() == expected[name].keys()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, requests))
    assert all(ok for _, ok in results)
    stats = cache.stats
    assert stats.hits + stats.misses == len(requests)
    assert stats.misses >= len(set(requests)) and stats.decoded_evictions >= stats.misses - 3 - 1
    assert stats.hits > 0 and stats.decoded_evictions > 0
    assert len(cache.decoded) <= 3 and all(device == "cpu" for _, device in cache.decoded)


def test_concurrent_misses_decode_once(catalog):
    paths, _ = catalog
    cache = sqz.AdapterCache()
    cache.add("a", paths["a5"])
    barrier = threading.Barrier(8)

    def ask(_):
        barrier.wait()
        return cache.get("a")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert cache.stats.misses == 1 and cache.stats.hits == 7
    assert all(r["base_model.model.l0.q.lora_A.weight"] is results[0]["base_model.model.l0.q.lora_A.weight"]
               for r in results)  # one decode, shared


def test_host_budget_drops_file_backed_bytes_and_refuses_the_rest(catalog):
    paths, expected = catalog
    size = paths["a0"].stat().st_size
    cache = sqz.AdapterCache(max_host_bytes=int(2.5 * size), max_decoded=1)
    for name in ("a0", "a1", "a2"):
        cache.add(name, paths[name])
    assert cache.host_bytes <= 2.5 * size and cache.stats.host_evictions == 1
    for name in ("a0", "a1", "a2", "a0"):
        assert all(torch.equal(cache.get(name)[k], v) for k, v in expected[name].items())
    assert cache.stats.rereads >= 2 and cache.host_bytes <= 2.5 * size

    tight = sqz.AdapterCache(max_host_bytes=int(1.5 * size))
    tight.add("mem", paths["a3"].read_bytes())
    with pytest.raises(sqz.CacheFullError, match="no file backs"):
        tight.add("more", paths["a4"].read_bytes())
    assert "mem" in tight and "more" not in tight and len(tight) == 1


def test_bad_files_and_names(catalog, tmp_path):
    paths, _ = catalog
    cache = sqz.AdapterCache()
    data = bytearray(paths["a0"].read_bytes())
    data[20] ^= 0xFF
    with pytest.raises(sqz.FormatError, match="^adapter 'bad': "):
        cache.add("bad", bytes(data))
    flipped = bytearray(paths["a0"].read_bytes())
    flipped[-10] ^= 0x01  # in the data: the file is held, its tensor fails when decoded
    cache.add("flipped", bytes(flipped))
    with pytest.raises(sqz.ChecksumError, match="^adapter 'flipped': tensor "):
        cache.get("flipped")
    cache.remove("flipped")
    with pytest.raises(sqz.InputError, match="cannot read"):
        cache.add("gone", tmp_path / "missing.sqz")
    with pytest.raises(KeyError, match="no adapter named 'x'"):
        cache.get("x")
    cache.add("a", paths["a0"])
    cache.remove("a")
    assert "a" not in cache and len(cache) == 0
