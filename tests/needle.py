"""A synthetic needle case: a fact planted in one of several filler chunks, and a question about it."""
FILLER_SUBJECTS = ["The river", "A farmer", "The old library", "Our neighbour", "The committee", "A small boat",
                   "The museum", "The train", "A gardener", "The school"]
FILLER_VERBS = ["opened early on", "was repainted on", "closed for repairs on", "hosted a fair on",
                "was quiet on", "welcomed visitors on", "changed its schedule on"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NEEDLE = "The secret passphrase for the vault is marmalade falcon."
QUESTION = "What is the secret passphrase for the vault?"


def filler(seed: int, n_sentences: int = 14) -> str:
    out = []
    for i in range(n_sentences):
        k = seed * 31 + i * 7
        out.append(f"{FILLER_SUBJECTS[k % 10]} {FILLER_VERBS[(k // 3) % 7]} {DAYS[(k // 5) % 7]}.")
    return " ".join(out)


def needle_documents(n_chunks: int = 5, needle_chunk: int = 3) -> list[str]:
    docs = [filler(i) for i in range(n_chunks)]
    sentences = docs[needle_chunk].split(". ")
    middle = len(sentences) // 2          # mid-chunk, so a chunk-head rule (EPIC) does not get it for free
    docs[needle_chunk] = ". ".join(sentences[:middle]) + f". {NEEDLE} " + ". ".join(sentences[middle:])
    return docs


def needle_positions(tokenizer, layout, needle_chunk: int = 3) -> set[int]:
    """Absolute positions of the needle sentence's tokens inside the fused prompt."""
    chunk = layout.chunks[needle_chunk]
    start = layout.chunk_starts[needle_chunk]
    hit = tokenizer.decode(chunk).find(NEEDLE)
    assert hit >= 0
    positions = set()
    for i in range(len(chunk)):       # token i covers characters [before, after) of the decoded chunk
        before, after = len(tokenizer.decode(chunk[:i])), len(tokenizer.decode(chunk[: i + 1]))
        if hit < after and before < hit + len(NEEDLE):
            positions.add(start + i)
    return positions
