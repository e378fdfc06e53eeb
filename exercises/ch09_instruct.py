"""Chapter 9, visual instruction tuning: your exercises. Fill each function, then run
`minillava grade ch09`.

Stage 2 teaches the model to follow instructions: the loss goes on the assistant's turns only,
and the decoder is fine-tuned, fully or through LoRA adapters that you write here by hand.
Compare with minillava/lora.py (LoRALinear, apply_lora, merge_lora) and
minillava/tokenizer.py (Tokenizer.render).

Shapes: x (..., in) inputs, W (out, in) a linear layer's weight (nn.Linear's layout), r the LoRA
rank, A (r, in) and B (out, r) the LoRA factors, T tokens.
"""

from __future__ import annotations

from torch import Tensor, nn


def init_lora_factors(in_features: int, out_features: int, rank: int) -> tuple[Tensor, Tensor]:
    """Create LoRA's two factors for a layer with weight W (out_features, in_features).

    Returns (lora_A (rank, in_features), lora_B (out_features, rank)) such that:
    - B A is exactly 0: the adapted layer starts out identical to the pretrained one, so
      fine-tuning begins from the model you had, not from a randomly perturbed one;
    - training can still move: the gradient of the loss with respect to B is (roughly)
      (x Aᵀ)ᵀ · grad_out, which is zero if A is zero too. So A must be random.
    Hint: initialise A the way nn.Linear initialises its weight (torch.nn.init.kaiming_uniform_,
    as nn.Linear's reset_parameters calls it), or with small Gaussian values; B starts as all
    zeros.
    """
    raise NotImplementedError


def lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, alpha: float
) -> Tensor:
    """A linear layer plus its low-rank update: (..., in) -> (..., out).

        y = x Wᵀ + b + (alpha / r) · x Aᵀ Bᵀ          r: the rank, lora_A's number of rows

    weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r).
    The factor alpha / r keeps the update's size about the same when you change the rank, so a
    learning rate tuned at r = 8 still works at r = 16.
    Hint: multiply x by Aᵀ first, which gives a thin (..., r) tensor, and only then by Bᵀ;
    never build the (out, in) matrix B A.
    """
    raise NotImplementedError


def merge_lora_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, alpha: float) -> Tensor:
    """Fold the update into the weight: W' = W + (alpha / r) · B A, shape (out, in).

    After merging, a plain linear layer with W' gives exactly what lora_forward gives, at no
    extra cost: nothing of LoRA is left at inference time.
    Careful with the order: B (out, r) times A (r, in) is (out, in). Aᵀ Bᵀ is its transpose,
    which has the right shape only when out equals in, and is then silently wrong.
    """
    raise NotImplementedError


def merge_lora(model: nn.Module) -> nn.Module:
    """Stretch exercise: fold every LoRA adapter of a model into its weight, and take LoRA out.

    `model` went through minillava.lora.apply_lora: some of its nn.Linear layers are now
    LoRALinear modules, each holding the frozen layer as `.base` (weight W (out, in), bias b or
    None), the factors `.lora_A` (r, in) and `.lora_B` (out, r), `.alpha`, and a `.dropout`
    used in training only. Replace every LoRALinear, in the module that holds it, by a plain
    nn.Linear with the weight W' = W + (alpha / r) B A (merge_lora_weight above) and the same
    bias, and return `model` itself. Afterwards:
    - the model gives the outputs the adapted one gave (in eval mode, to float rounding);
    - no LoRA module is left; the state_dict has exactly the names of the model before
      apply_lora ("layers.0.self_attn.q_proj.weight", not "...q_proj.base.weight") and as
      many parameters, so the merged model loads wherever the original did;
    - each new layer has the dtype and device of the weight it replaces (a bfloat16 model
      merged into float32 layers doubles in size, and breaks at its first matrix product).

    Change the model's structure, not the tensors it holds: write W' into a new layer and leave
    W, A and B as they were (the grader checks). The caller may still hold the adapted layers,
    to keep training them or to try another merge; minillava.lora.merge_lora, by contrast,
    adds the update into W itself, which is why LoRALinear also has an `unmerge`.

    Why: PEFT's merge_and_unload and LLaVA's merge script do this before a LoRA model is shipped:
    inference then costs exactly what it cost before LoRA. Think about how to reach the module
    that holds a layer (named_modules gives dotted names such as "layers.0.self_attn.q_proj"),
    why the LoRA layers are best collected before any is replaced, and what a new linear layer
    holds before you fill it.
    """
    raise NotImplementedError("merge_lora: your code here (chapter 9, stretch)")


def assistant_labels(
    input_ids: Tensor, assistant_id: int, eot_id: int, ignore_index: int = -100
) -> Tensor:
    """The labels of a conversation rendered with the chat template: loss on the answers only.

    input_ids (T,): a multi-turn conversation as tokenizer.render writes it,

        {system}<|user|><image>\\n{q1}<|assistant|>{a1}<|endoftext|><|user|>{q2}<|assistant|>{a2}...

    possibly cut short (the last answer may have no <|endoftext|>) or followed by padding.
    Returns (T,) long: the token id on every answer token and on the <|endoftext|> that closes
    each answer (so the model learns to stop), ignore_index everywhere else: the system line,
    the user's turns, the role tokens <|user|> and <|assistant|> themselves, the padding.

        ids     [sys <|user|> q q <|assistant|> a a EOT <|user|> q <|assistant|> a EOT pad]
        labels  [ -     -     - -      -        a a EOT    -     -      -        a EOT  - ]

    Every answer counts, not only the last one. Hint: walk the ids with a flag "inside an
    answer", switched on after <|assistant|> and off after <|endoftext|>.
    """
    raise NotImplementedError


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total): how many numbers the optimizer updates, and how many the model has.

    trainable counts the parameters with requires_grad=True. A tensor shared by two modules
    (the decoder ties its embedding table and its output layer) counts once: it is one set of
    numbers. Buffers (e.g. RoPE's cos/sin tables) are not parameters.
    Hint: a module's parameters method yields each parameter once, a shared one too; numel is
    a tensor's number of elements. The state_dict is the wrong tool here: it lists a tied
    tensor under both its names and includes the buffers.
    """
    raise NotImplementedError


# The three scenes your instruction samples are about: ShapesWorld("train")[i] for these i, with
# the default world. The notebook draws them and prints their annotations; `minillava data
# export` names their images train_000000.png, train_000001.png, train_000002.png.
SAMPLE_SCENES = (0, 1, 2)


def instruction_samples() -> list[dict]:
    """Write three high-quality LLaVA-format instruction samples, one for each scene of
    SAMPLE_SCENES, in that order. Returns a list of three records like

        {"id": "my_sample_0",
         "image": "train_000000.png",
         "conversations": [
             {"from": "human", "value": "<image>\\nWhat is in the middle left of the picture?"},
             {"from": "gpt", "value": "..."},
             {"from": "human", "value": "..."},
             {"from": "gpt", "value": "..."}]}

    What the grader asks of them, and why (chapter 9, section 1):
    - the format a LLaVA trainer reads: turns alternate human, gpt; `<image>` exactly once, in
      the first human turn;
    - a conversation, not a single question: at least two rounds in each sample;
    - variety: across the three samples, at least three kinds of question (colour, shape,
      position, counting, existence, text, description, reasoning);
    - every fact true to the scene: an object you name must be there, with the cell, size,
      colour and shape you give it; a count or a character you state must be right. Write the
      answers as sentences that name what they talk about ("There is a large purple diamond in
      the middle left."): a bare "Purple." cannot be checked, and the grader counts only what
      it can check (at least two facts a sample).
    """
    raise NotImplementedError
