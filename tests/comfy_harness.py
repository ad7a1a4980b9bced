"""Test support for the ComfyUI tests (tests/test_comfyui_*.py): a real ComfyUI checkout
found through COMFYUI_PATH, in this process or as a server on loopback.

- ``install_import_stubs()``: torchvision / torchaudio are not importable beside the CPU
  torch 2.13 these tests run on (PyPI's torchvision fails: 'operator torchvision::nms does
  not exist'), and ComfyUI imports them at module level (comfy/ldm/cosmos, comfy_extras...)
  for models these tests never use. Where the real package is missing, a stub module
  stands in: importing works, touching anything in it raises ImportError. Only in the
  test process and the server it starts; nothing outside tests/ knows about it.
- ``import_comfyui()``: ComfyUI's modules in this process, on the CPU.
- ``tiny_flux_state_dict()``: a Flux-type diffusion model with Flux's real key names and
  small widths (hidden 128, one head, 2 double + 2 single blocks), random weights.
- ``ComfyServer``: ``python tests/comfy_harness.py serve`` runs ComfyUI's main.py (with
  the stubs) in a temporary base directory with this repository linked into custom_nodes;
  prompts go through the HTTP /prompt API.

Run as a script: ``python tests/comfy_harness.py serve COMFYUI_PATH [main.py args...]``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- import stubs
class _MissingMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise ImportError(f"{cls.__qualname__}: torchvision/torchaudio are test stubs here (not installed)")

    def __getitem__(cls, item):
        return cls


def _missing(name: str):
    return _MissingMeta(name, (), {"__qualname__": name})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{self.__name__}.{name}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+stub"
        return module

    def exec_module(self, module):
        pass


def install_import_stubs() -> list[str]:
    """Stub torchvision/torchaudio (and the modules in COMFY_TEST_STUBS, comma-separated)
    where they cannot be imported; returns the stubbed names."""
    if any(isinstance(f, _StubFinder) for f in sys.meta_path):
        return sorted(next(f for f in sys.meta_path if isinstance(f, _StubFinder)).roots)
    roots = []
    extra = [n for n in os.environ.get("COMFY_TEST_STUBS", "").split(",") if n]
    for name in ("torchvision", "torchaudio", *extra):
        try:
            __import__(name)
        except Exception:
            sys.modules.pop(name, None)
            roots.append(name)
    if roots:
        sys.meta_path.insert(0, _StubFinder(roots))
    return roots


def comfyui_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    return path if path and os.path.isfile(os.path.join(path, "main.py")) else None


def import_comfyui():
    """ComfyUI's packages importable in this process, on the CPU (COMFY_TEST_DEVICE=cuda: on
    the GPU, with dynamic VRAM as ComfyUI's main.py sets it up). Returns the comfy package."""
    path = comfyui_path()
    if path is None:
        raise RuntimeError("COMFYUI_PATH does not point at a ComfyUI checkout")
    install_import_stubs()
    if path not in sys.path:
        sys.path.insert(0, path)
    # ComfyUI's comfy is a namespace package, so any regular package named comfy on
    # sys.path wins over it. pytest puts the parent of a checkout that holds an __init__.py
    # (ours does, for custom_nodes) on sys.path, so a checkout folder named "comfy" would
    # shadow ComfyUI's.
    for entry in list(sys.path):
        if entry != path and os.path.isfile(os.path.join(entry or ".", "comfy", "__init__.py")):
            sys.path.remove(entry)
    shadow = sys.modules.get("comfy")
    if shadow is not None and getattr(shadow, "__file__", None):
        del sys.modules["comfy"]
        # inspect caches module files by name; a stale entry for the shadow makes
        # inspect.getmodule() (torch.library calls it) choke on the namespace package.
        import inspect

        inspect._filesbymodname.pop("comfy", None)
    from comfy.cli_args import args

    on_gpu = os.environ.get("COMFY_TEST_DEVICE", "cpu") == "cuda"
    args.cpu = not on_gpu
    import comfy.model_management  # noqa: F401  (device set up from args)
    import comfy.sd  # noqa: F401
    import comfy

    if on_gpu and os.environ.get("COMFY_TEST_DYNAMIC_VRAM", "1") == "1":
        _enable_dynamic_vram()
    return comfy


def _enable_dynamic_vram() -> None:
    """What ComfyUI's main.py does on an NVIDIA GPU: comfy-aimdo's dynamic VRAM loader."""
    import comfy_aimdo.control

    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    try:
        comfy_aimdo.control.init(simple_vram_headroom=None)
    except TypeError:  # comfy-aimdo 0.4.9 protocol, as main.py handles it
        comfy_aimdo.control.init()
    devices = [d.index for d in comfy.model_management.get_all_torch_devices()]
    try:
        ok = comfy_aimdo.control.init_devices([(i, 0) for i in devices])
    except TypeError:
        ok = comfy_aimdo.control.init_devices(devices)
    if ok:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    else:
        raise RuntimeError("comfy-aimdo did not initialise on this GPU")


# ----------------------------------------------------------------------------- tiny Flux
TINY_FLUX = dict(hidden=128, depth=2, single=2, context=64, vec=32, in_channels=16, mlp_ratio=4)


def tiny_flux_state_dict(seed: int = 0, dtype=None, **overrides) -> dict:
    """Flux key names (as in flux1-dev.safetensors), small widths, random weights with
    1/sqrt(fan_in) scale so that activations stay O(1) through the blocks. ``hidden`` must
    be a multiple of 128 (ComfyUI derives the head count as hidden / 128)."""
    import torch

    cfg = dict(TINY_FLUX, **overrides)
    h, ctx, vec, mlp = cfg["hidden"], cfg["context"], cfg["vec"], cfg["hidden"] * cfg["mlp_ratio"]
    dtype = dtype or torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def linear(name, n, k, bias=True):
        sd[f"{name}.weight"] = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
        if bias:
            sd[f"{name}.bias"] = (torch.randn(n, generator=gen) * 0.02).to(dtype)

    def norm(name, n):
        sd[f"{name}.scale"] = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)

    head = 128  # Flux's head width: sum(axes_dim); QK norms are per head

    patch_in = cfg["in_channels"] * 4
    linear("img_in", h, patch_in)
    linear("txt_in", h, ctx)
    for emb, k in (("time_in", 256), ("vector_in", vec), ("guidance_in", 256)):
        linear(f"{emb}.in_layer", h, k)
        linear(f"{emb}.out_layer", h, h)
    for i in range(cfg["depth"]):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            linear(f"{b}_mod.lin", 6 * h, h)
            linear(f"{b}_attn.qkv", 3 * h, h)
            norm(f"{b}_attn.norm.query_norm", head)
            norm(f"{b}_attn.norm.key_norm", head)
            linear(f"{b}_attn.proj", h, h)
            linear(f"{b}_mlp.0", mlp, h)
            linear(f"{b}_mlp.2", h, mlp)
    for i in range(cfg["single"]):
        b = f"single_blocks.{i}"
        linear(f"{b}.linear1", 3 * h + mlp, h)
        linear(f"{b}.linear2", h, h + mlp)
        norm(f"{b}.norm.query_norm", head)
        norm(f"{b}.norm.key_norm", head)
        linear(f"{b}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", patch_in, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return sd


def tiny_flux_lora(seed: int = 1, rank: int = 4, scale: float = 1.0, layers=None) -> dict:
    """A LoRA for the tiny Flux in ComfyUI's key naming ("diffusion_model.<layer>.lora_up")."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, mlp = TINY_FLUX["hidden"], TINY_FLUX["hidden"] * TINY_FLUX["mlp_ratio"]
    shapes = {}
    for i in range(TINY_FLUX["depth"]):
        for s in ("img", "txt"):
            shapes[f"double_blocks.{i}.{s}_attn.qkv"] = (3 * h, h)
            shapes[f"double_blocks.{i}.{s}_attn.proj"] = (h, h)
            shapes[f"double_blocks.{i}.{s}_mlp.0"] = (mlp, h)
            shapes[f"double_blocks.{i}.{s}_mlp.2"] = (h, mlp)
    for i in range(TINY_FLUX["single"]):
        shapes[f"single_blocks.{i}.linear1"] = (3 * h + mlp, h)
        shapes[f"single_blocks.{i}.linear2"] = (h, h + mlp)
    sd = {}
    for layer, (n, k) in shapes.items():
        if layers is not None and layer not in layers:
            continue
        sd[f"diffusion_model.{layer}.lora_down.weight"] = (torch.randn(rank, k, generator=gen) / k ** 0.5).to(torch.bfloat16)
        sd[f"diffusion_model.{layer}.lora_up.weight"] = (torch.randn(n, rank, generator=gen) * scale / rank ** 0.5).to(torch.bfloat16)
        sd[f"diffusion_model.{layer}.alpha"] = torch.tensor(float(rank))
    return sd


# A node pack for the tests: conditioning for the tiny Flux without a text encoder.
TEST_NODES = '''
import torch

class CQTestConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 8}),
                             "context": ("INT", {"default": 64}), "pooled": ("INT", {"default": 32}),
                             "guidance": ("FLOAT", {"default": 3.5})}}

    def make(self, seed, tokens, context, pooled, guidance):
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, tokens, context, generator=g)
        return ([[cond, {"pooled_output": torch.randn(1, pooled, generator=g), "guidance": guidance}]],)

NODE_CLASS_MAPPINGS = {"CQTestConditioning": CQTestConditioning}
'''


# ----------------------------------------------------------------------------- server
class ComfyServer:
    """ComfyUI's server for one test session, in ``base`` (models/, output/, custom_nodes/)."""

    def __init__(self, base: str, port: int, extra_args=(), log_path: str | None = None):
        self.base, self.port = base, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path or os.path.join(base, "server.log")
        for d in ("custom_nodes", "models/diffusion_models", "models/loras", "input", "output", "user",
                  "frontend"):
            os.makedirs(os.path.join(base, d), exist_ok=True)
        link = os.path.join(base, "custom_nodes", "comfy_quant_native_pack")
        if not os.path.lexists(link):
            os.symlink(REPO, link)
        os.makedirs(os.path.join(base, "custom_nodes", "cq_test_nodes"), exist_ok=True)
        with open(os.path.join(base, "custom_nodes", "cq_test_nodes", "__init__.py"), "w") as f:
            f.write(TEST_NODES)
        self.args = ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
                     "--front-end-root", os.path.join(base, "frontend"), "--disable-auto-launch",
                     "--database-url", "sqlite:///:memory:", *extra_args]
        self.proc = None

    def start(self, timeout: float = 180.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", comfyui_path(), *self.args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.base)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer in {timeout}s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self._log.close()

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "<no log>"

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read())

    def post(self, route: str, body: dict):
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return {"http_error": e.code, **json.loads(e.read() or b"{}")}

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue ``prompt`` (API format) and wait for it. Returns its /history entry
        (``status.status_str`` is 'success' or 'error'; errors in ``status.messages``)."""
        queued = self.post("/prompt", {"prompt": prompt})
        if "prompt_id" not in queued:
            raise AssertionError(f"/prompt refused the workflow: {json.dumps(queued)[:2000]}")
        pid = queued["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{pid}")
            if pid in history and history[pid].get("status", {}).get("completed") is not None:
                entry = history[pid]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died running the prompt; log:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout}s; log:\n{self.log_tail()}")


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a /history entry, or None."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def _serve(argv: list[str]) -> None:
    comfy_path, args = argv[0], argv[1:]
    install_import_stubs()
    sys.path.insert(0, comfy_path)
    sys.argv = [os.path.join(comfy_path, "main.py"), *args]
    import runpy

    runpy.run_path(os.path.join(comfy_path, "main.py"), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        _serve(sys.argv[2:])
    else:
        sys.exit("usage: comfy_harness.py serve COMFYUI_PATH [main.py args...]")
