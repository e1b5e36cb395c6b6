"""Session-4 experiment, kept as run (2026-11-25): relu^2 fused into a Triton matmul epilogue, forward (store relu(acc)^2) and
backward (acc * 2 sqrt(post)), against cuBLAS + the compiled elementwise kernel, at the MLP shape."""
import os, sys, itertools, torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def mm_relu2_c(a_desc, b_desc, c_desc, aux_desc, M, N: tl.constexpr, K: tl.constexpr, BACKWARD: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, PROGRAMS: tl.constexpr, ITERS: tl.constexpr, PREFETCH: tl.constexpr):
    """Constexpr loop bounds (Triton's interpreter needs them); the last round's spare programs redo the last tile."""
    num_n: tl.constexpr = (N + BN - 1) // BN
    last = tl.cdiv(M, BM) * num_n - 1
    for i in tl.range(0, ITERS, flatten=True):
        tile = tl.minimum(tl.program_id(0) + i * PROGRAMS, last)
        off_m = (tile // num_n) * BM
        off_n = (tile % num_n) * BN
        if BACKWARD and PREFETCH:
            aux = aux_desc.load([off_m, off_n])
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a_desc.load([off_m, k]), b_desc.load([k, off_n]), acc)
        if BACKWARD:
            if not PREFETCH:
                aux = aux_desc.load([off_m, off_n])
            out = acc * 2.0 * tl.sqrt(aux.to(tl.float32))
        else:
            out = tl.maximum(acc, 0.0)
            out = out * out
        c_desc.store([off_m, off_n], out.to(tl.bfloat16))


@triton.jit
def mm_relu2_ws(a_desc, b_desc, c_desc, aux_desc, M, N: tl.constexpr, K: tl.constexpr, BACKWARD: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, PROGRAMS: tl.constexpr, ITERS: tl.constexpr, WS: tl.constexpr, SPLIT: tl.constexpr):
    num_n: tl.constexpr = (N + BN - 1) // BN
    last = tl.cdiv(M, BM) * num_n - 1
    for i in tl.range(0, ITERS, flatten=True, warp_specialize=WS):
        tile = tl.minimum(tl.program_id(0) + i * PROGRAMS, last)
        off_m = (tile // num_n) * BM
        off_n = (tile % num_n) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a_desc.load([off_m, k]), b_desc.load([k, off_n]), acc)
        if SPLIT:
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            for j, part in ((0, acc0), (1, acc1)):
                if BACKWARD:
                    out = part * 2.0 * tl.sqrt(aux_desc.load([off_m, off_n + j * (BN // 2)]).to(tl.float32))
                else:
                    out = tl.maximum(part, 0.0)
                    out = out * out
                c_desc.store([off_m, off_n + j * (BN // 2)], out.to(tl.bfloat16))
        else:
            if BACKWARD:
                out = acc * 2.0 * tl.sqrt(aux_desc.load([off_m, off_n]).to(tl.float32))
            else:
                out = tl.maximum(acc, 0.0)
                out = out * out
            c_desc.store([off_m, off_n], out.to(tl.bfloat16))


def run_ws(a, b, aux, cfg, out=None):
    BM, BN, BK, warps, stages, ws, split = cfg[1:]
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty(M, N, device=a.device, dtype=torch.bfloat16) if out is None else out
    cb = [BM, BN // 2] if split else [BM, BN]
    a_d = TensorDescriptor.from_tensor(a, [BM, BK])
    b_d = TensorDescriptor.from_tensor(b, [BK, BN])
    c_d = TensorDescriptor.from_tensor(out, cb)
    x_d = TensorDescriptor.from_tensor(aux if aux is not None else out, cb)
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    progs = min(tiles, 132)
    mm_relu2_ws[(progs,)](a_d, b_d, c_d, x_d, M, N, K, aux is not None, BM, BN, BK, progs, triton.cdiv(tiles, progs), ws, split,
                          num_warps=warps, num_stages=stages)
    return out


@triton.jit
def mm_relu2(a_desc, b_desc, c_desc, aux_desc, M, N, K, BACKWARD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr, PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr):
    num_n = tl.cdiv(N, BN)
    tiles = tl.cdiv(M, BM) * num_n
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN):
        off_m = (tile // num_n) * BM
        off_n = (tile % num_n) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a_desc.load([off_m, k]), b_desc.load([k, off_n]), acc)
        if BACKWARD:
            out = acc * 2.0 * tl.sqrt(aux_desc.load([off_m, off_n]).to(tl.float32))
        else:
            out = tl.maximum(acc, 0.0)
            out = out * out
        c_desc.store([off_m, off_n], out.to(tl.bfloat16))


def run(a, b, aux, cfg, out=None):
    if cfg[0] == "ws":
        return run_ws(a, b, aux, cfg, out)
    if len(cfg) == 6:
        return run_c(a, b, aux, cfg, out)
    BM, BN, BK, warps, stages, persistent, flatten = cfg
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty(M, N, device=a.device, dtype=torch.bfloat16) if out is None else out
    a_d = TensorDescriptor.from_tensor(a, [BM, BK])
    b_d = TensorDescriptor.from_tensor(b, [BK, BN])
    c_d = TensorDescriptor.from_tensor(out, [BM, BN])
    x_d = TensorDescriptor.from_tensor(aux if aux is not None else out, [BM, BN])
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    progs = min(tiles, 132) if persistent else tiles
    mm_relu2[(progs,)](a_d, b_d, c_d, x_d, M, N, K, aux is not None, BM, BN, BK, progs, flatten,
                       num_warps=warps, num_stages=stages)
    return out


def run_c(a, b, aux, cfg, out=None):
    BM, BN, BK, warps, stages, prefetch = cfg
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty(M, N, device=a.device, dtype=torch.bfloat16) if out is None else out
    a_d = TensorDescriptor.from_tensor(a, [BM, BK])
    b_d = TensorDescriptor.from_tensor(b, [BK, BN])
    c_d = TensorDescriptor.from_tensor(out, [BM, BN])
    x_d = TensorDescriptor.from_tensor(aux if aux is not None else out, [BM, BN])
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    progs = min(tiles, 132)
    mm_relu2_c[(progs,)](a_d, b_d, c_d, x_d, M, N, K, aux is not None, BM, BN, BK, progs, triton.cdiv(tiles, progs), prefetch,
                         num_warps=warps, num_stages=stages)
    return out


if __name__ == "__main__":
    from triton.testing import do_bench
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    interp = dev == "cpu"
    if interp:
        triton.runtime.driver.set_active_to_cpu() if hasattr(triton.runtime.driver, "set_active_to_cpu") else None
    M, K, N = (98304, 512, 1536) if not interp else (256, 128, 256)
    torch.manual_seed(0)
    x = torch.randn(M, K, device=dev).bfloat16()
    w = (torch.randn(N, K, device=dev) / K ** 0.5).bfloat16()  # fc weight (out, in)
    wp = (torch.randn(K, N, device=dev) / N ** 0.5).bfloat16()  # proj weight (out=K, in=N)
    g = torch.randn(M, K, device=dev).bfloat16()  # grad of the MLP output
    wt = w.T.contiguous()
    pre = x @ w.T
    post_ref = torch.relu(pre.float()).square().bfloat16()
    dpost = g @ wp
    dpre_ref = (dpost.float() * 2 * torch.relu(pre.float())).bfloat16()
    truth_post = torch.relu(x.double() @ w.double().T).square()
    truth_dpre = (g.double() @ wp.double()) * 2 * torch.relu(x.double() @ w.double().T)
    rel = lambda a, t: ((a.double() - t).norm() / t.norm()).item()
    print(f"ACC unfused: post {rel(post_ref, truth_post):.2e} dpre {rel(dpre_ref, truth_dpre):.2e}")
    cfgs = [(128, 256, 64, 8, 3, True, True), (128, 256, 64, 8, 3, True, False), (128, 256, 64, 8, 3, False, False),
            (128, 128, 64, 4, 4, True, True), (128, 128, 64, 8, 4, True, True), (128, 128, 64, 4, 4, False, False),
            (256, 128, 64, 8, 3, True, True), (128, 256, 64, 8, 4, True, True), (128, 192, 64, 8, 3, True, True),
            (64, 256, 64, 4, 4, True, True)]
    cfgs = [("ws", 128, 128, 64, 4, 4, False, False), ("ws", 128, 128, 64, 4, 4, True, False), ("ws", 128, 128, 64, 8, 4, True, False),
            ("ws", 128, 128, 64, 4, 4, False, True), ("ws", 128, 256, 64, 8, 3, False, True), ("ws", 128, 256, 64, 8, 3, True, True),
            ("ws", 128, 256, 64, 8, 4, False, True), ("ws", 128, 128, 64, 4, 5, False, False), ("ws", 128, 128, 64, 4, 3, False, False),
            ("ws", 128, 256, 64, 8, 3, True, False), ("ws", 256, 128, 64, 8, 3, False, True), ("ws", 128, 128, 128, 4, 3, False, False)]
    cfgs_old = [(128, 128, 64, 4, 4, False), (128, 128, 64, 4, 4, True), (128, 128, 64, 8, 4, False), (128, 128, 64, 8, 4, True),
            (128, 256, 64, 8, 3, False), (128, 256, 64, 8, 2, False), (128, 128, 64, 4, 3, True)] + cfgs[:5]
    if interp:
        cfgs = [(64, 64, 32, 4, 2, False), (64, 64, 32, 4, 2, True)]
    if not interp:
        relu2 = torch.compile(lambda p: torch.relu(p).square())
        relu2_bwd = torch.compile(lambda d, p: d * 2 * torch.relu(p))
        relu2(pre); relu2_bwd(dpost, pre)
        t_mm_f = do_bench(lambda: x @ w.T, return_mode="median")
        t_el_f = do_bench(lambda: relu2(pre), return_mode="median")
        t_mm_b = do_bench(lambda: g @ wp, return_mode="median")
        t_el_b = do_bench(lambda: relu2_bwd(dpost, pre), return_mode="median")
        print(f"TIME cuBLAS fwd mm {1000*t_mm_f:.1f} + relu2 {1000*t_el_f:.1f} = {1000*(t_mm_f+t_el_f):.1f} us; "
              f"bwd mm {1000*t_mm_b:.1f} + elementwise {1000*t_el_b:.1f} = {1000*(t_mm_b+t_el_b):.1f} us")
    for cfg in cfgs:
        try:
            post = run(x, wt, None, cfg)
            dpre = run(g, wp, post, cfg)
            msg = f"post {rel(post, truth_post):.2e} dpre {rel(dpre, truth_dpre):.2e}"
            if not interp:
                tf = do_bench(lambda: run(x, wt, None, cfg, post), return_mode="median")
                tb = do_bench(lambda: run(g, wp, post, cfg, dpre), return_mode="median")
                msg += f"  fwd {1000*tf:.1f} us ({2*M*N*K/tf/1e9:.0f} TF/s)  bwd {1000*tb:.1f} us"
            print(f"CFG {cfg}: {msg}", flush=True)
        except Exception as e:
            print(f"CFG {cfg}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
