import lzma, json, numpy as np, sentencepiece as spm, math
sp = spm.SentencePieceProcessor(model_file='../shared/data/tokenizers/fineweb_8192_bpe.model')
lens = []
with lzma.open('../shared/data/proxy/val.jsonl.xz', 'rt') as f:
    for line in f:
        lens.append(len(sp.encode(json.loads(line)['text'])) + 1)  # BOS + pieces; targets = len (next BOS)
lens = np.array(sorted(lens, reverse=True))
print("docs", len(lens), "tokens", lens.sum(), "max", lens[:5], "median", np.median(lens))
S = 2048; budget = 32 * S
for C in (32, 48, 64):
    steps = passes = 0; i = 0
    while i < len(lens):
        B = max(1, budget // min(lens[i], S)); b = lens[i:i+B]; i += B
        for k in range(math.ceil(b[0] / C)):
            live = (b > k * C).sum(); hi = min((k+1)*C, b[0]); lo = max(0, (k+1)*C - S)
            steps += 1; passes += live * (hi - lo)
    print(f"C={C}: steps {steps}, token-passes {passes/1e6:.1f}M ({passes/lens.sum():.1f}x tokens)")
