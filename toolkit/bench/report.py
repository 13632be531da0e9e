"""Printing a bench result (three modes) and plotting throughput."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_result", "print_result"]


def print_result(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    m = result["machine"]
    console.print(f"[bold]{result['mode']}[/] on {m['cpu']} ({m['cores']} cores; {' '.join(m['isa'])})")
    if result["mode"] == "images":
        console.print(f"{result['model']} image tower, {result['precision']} on {result['device']}, {result['threads']} "
                      f"threads; {result['images']} decoded photos (640x480 to 1024x768) -> "
                      f"{result['image_size'][0]}x{result['image_size'][1]}")
        table = Table("engine", "batch", "images/s", "ms/batch", "spread %", "preprocessing share", "ratio vs transformers")
        for r in result["rows"]:
            ratio = f"{r['ratio_vs_reference']:.2f}x" if r["ratio_vs_reference"] else "-"
            table.add_row(r["engine"], str(r["batch_size"]), f"{r['images_per_s']:.1f}", f"{r['ms_per_batch']:.1f}",
                          f"{r['spread_pct']:.1f}", f"{r['preprocess_share'] * 100:.0f}%", ratio)
        console.print(table)
        if result["min_cosine_vs_reference"] is not None:
            console.print(f"min cosine vs transformers: {result['min_cosine_vs_reference']:.7f}")
        return
    if result["mode"] == "in-process":
        t = result["corpus_tokens"]
        console.print(f"{result['model']} {result['precision']} on {result['device']}, {result['threads']} threads; corpus "
                      f"{t['n']} texts, tokens mean {t['mean']:.1f} p50 {t['p50']:.0f} p90 {t['p90']:.0f} max {t['max']}")
        table = Table("engine", "batch", "sentences/s", "tokens/s", "ms/batch", "spread %", "ratio vs ST")
        for r in result["rows"]:
            ratio = f"{r['ratio_vs_reference']:.2f}x" if r["ratio_vs_reference"] else "-"
            table.add_row(r["engine"], str(r["batch_size"]), f"{r['sentences_per_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                          f"{r['ms_per_batch']:.2f}", f"{r['spread_pct']:.1f}", ratio)
        console.print(table)
        if result["min_cosine_vs_reference"] is not None:
            console.print(f"min cosine vs sentence-transformers: {result['min_cosine_vs_reference']:.7f}")
    else:
        baseline = "in_process" in result  # measured only when the server's ARTIFACT was given too
        ratios = ("vs in-proc bs32", "p50 vs bs1") if baseline else ()
        table = Table("clients", "requests", "errors", "req/s", "sent/s", "p50 ms", "p95 ms", "p99 ms", *ratios)
        for r in result["rows"]:
            cells = [f"{r['ratio_vs_inprocess_bs32']:.2f}", f"{r['p50_vs_inprocess_bs1']:.2f}"] if baseline else []
            table.add_row(str(r["concurrency"]), str(r["requests"]), str(r["errors"]), f"{r['requests_per_s']:.1f}",
                          f"{r['sentences_per_s']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['p99_ms']:.2f}",
                          *cells)
        console.print(table)
        if baseline:
            ip = result["in_process"]
            console.print(f"in-process on the same texts: bs1 p50 {ip[1]['p50_ms']:.2f} ms/call, "
                          f"bs32 {ip[32]['sentences_per_s']:.1f} sentences/s")
        else:
            console.print("no ratios to in-process calls: give the server's MODEL too (toolkit bench MODEL "
                          "--server URL) to measure that baseline")


def plot_result(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if result["mode"] == "in-process":
        for engine in dict.fromkeys(r["engine"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["engine"] == engine and isinstance(r["batch_size"], int)]
            line, = ax.plot([r["batch_size"] for r in rows], [r["sentences_per_s"] for r in rows], marker="o", label=engine)
            for r in result["rows"]:
                if r["engine"] == engine and r["batch_size"] == "corpus":
                    ax.axhline(r["sentences_per_s"], color=line.get_color(), linestyle="--", alpha=0.7,
                               label=f"{engine}, whole corpus in one call")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(f"{result['model']} ({result['precision']}, {result['machine']['cores']} cores)")
    else:
        rows = result["rows"]
        ax.plot([r["concurrency"] for r in rows], [r["sentences_per_s"] for r in rows], marker="o", label="server")
        inproc = {int(k): v for k, v in result.get("in_process", {}).items()}  # JSON turns the keys into strings
        for bs, style in ((32, "--"), (1, ":")):
            if bs in inproc:
                ax.axhline(inproc[bs]["sentences_per_s"], color="gray", linestyle=style,
                           label=f"in-process Embedder, calls of {bs}")
        top = max([r["sentences_per_s"] for r in rows] + [v["sentences_per_s"] for v in inproc.values()])
        ax.set_ylim(0, top * 1.12)
        ax.set_xlabel("concurrent clients (one sentence per request)")
        ax.set_title("toolkit serve under load")
    ax.set_ylabel("sentences / s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
