"""llama.cpp's mixture-of-experts placement flags on gguf-stream's commands:
--n-cpu-moe N, --cpu-moe and -ot PATTERN=CPU put the same layers' experts
out of VRAM as llama.cpp would (here they stream for prompts and the CPU or
the split computes them while generating); -ngl 99 goes with them; flags
that cannot mean that are one-line errors."""
import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import pytest
from conftest import CPU, N_GEN, PROMPT
from test_cli import T, assert_user_error, run_main

from gguf_stream import cli
from gguf_stream.cli.common import check_flags, explicit_placement
from gguf_stream.gguf_file import read_model


def placement_of(path, *flags):
    args = cli.build_parser().parse_args(["plan", str(path), "--device", "host", *flags])
    check_flags(args)
    return explicit_placement(args, read_model(path))


def test_the_flags_choose_llama_cpps_layers(tiny_glm4moe_path):
    """tiny-glm4moe: layer 0 dense, experts in layers 1-3."""
    p = tiny_glm4moe_path
    assert placement_of(p, "--n-cpu-moe", "3") == {"streamed_layers": (1, 2)}  # layers 0..2, 0 has no experts
    assert placement_of(p, "-ngl", "99", "--n-cpu-moe", "2") == {"streamed_layers": (1,)}
    assert placement_of(p, "--n-cpu-moe", "1") == {"n_streamed": 0}  # only the dense layer: nothing leaves VRAM
    assert placement_of(p, "--cpu-moe") == {"streamed_layers": (1, 2, 3)}
    assert placement_of(p, "-ngl", "-1", "-ot", "exps=CPU") == {"streamed_layers": (1, 2, 3)}
    assert placement_of(p, "-ot", r"blk\.(1|3)\.ffn_(up|down)_exps=CPU") == {"streamed_layers": (1, 3)}
    assert placement_of(p, "-ot", r"blk\.1\.ffn_up_exps=CPU,blk\.2\.ffn_up_exps=CPU",  # a list, and -ot again
                        "-ot", r"blk\.3\.ffn_gate_exps=CPU") == {"streamed_layers": (1, 2, 3)}


@pytest.mark.parametrize("flags, needles", [
    (["-ngl", "3", "--n-cpu-moe", "2"], ["-ngl and --n-cpu-moe both choose", "-ngl 99 goes with them"]),
    (["--vram-budget", "1GiB", "--cpu-moe"], ["--vram-budget and --cpu-moe both choose"]),
    (["--n-cpu-moe", "-1"], ["--n-cpu-moe must be at least 0"]),
    (["-ot", "attn=CPU"], ["-ot attn=CPU matches blk.", "only expert tensors"]),
    (["-ot", "exps=CUDA0"], ["takes PATTERN=CPU"]),
    (["-ot", "nothing_like_this=CPU"], ["matches no tensor"]),
    (["-ot", "(=CPU"], ["not a regular expression"]),
    (["--cpu-moe", "--whole-layers"], ["leave out --whole-layers"]),
])
def test_bad_moe_flags_are_one_line_errors(tiny_glm4moe_path, capsys, flags, needles):
    rc, _, err = run_main(capsys, "plan", str(tiny_glm4moe_path), "--device", "host", *flags)
    assert_user_error(rc, err, *needles)


def test_a_dense_model_has_no_experts_to_place(tiny_path, capsys):
    rc, _, err = run_main(capsys, "plan", str(tiny_path), "--device", "host", "--n-cpu-moe", "2")
    assert_user_error(rc, err, "--n-cpu-moe: llama has no experts", "-ngl N")


def test_run_with_n_cpu_moe_prints_stocks_greedy_text(tiny_moe_path, capsys):
    """gguf-stream run -ngl 99 --n-cpu-moe 3 (host mode): those layers' experts
    stream and the CPU computes them while generating; the text is stock's."""
    from gguf_stream.model import StockModel

    with StockModel(tiny_moe_path, 0, **CPU) as s:
        want = s.detokenize(s.generate(s.tokenize(PROMPT), N_GEN))
    rc, out, err = run_main(capsys, "run", str(tiny_moe_path), "--device", "host", "-ngl", "99", "--n-cpu-moe", "3",
                            "-p", PROMPT, "-n", str(N_GEN), "-t", T, "-c", "256", "-b", "64", "-ub", "64",
                            "--ignore-eos")
    assert rc == 0, err
    assert out.startswith(PROMPT) and out[len(PROMPT):].rstrip("\n") == want
    assert "3 of 4 layers' experts streamed (0, 1, 2)" in err
    assert "--n-cpu-moe: the experts of layers 0, 1, 2 leave VRAM as with llama.cpp" in err and "--vram-budget B" in err
