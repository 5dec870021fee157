"""Sudoku puzzles in OptNet's one-hot format, generated from a seed (no download).

A board of box size ``n`` has side ``N = n*n`` (n=2: 4x4, n=3: 9x9). Boards are int tensors
(..., N, N) with digits 1..N and 0 for a blank; the one-hot form is (..., N, N, N) with the digit
d stored at index d-1 of the last axis, so a blank cell is all zeros. Flattening the one-hot form
gives the N^3 variables of the QP layer, variable ``(r*N + c)*N + d-1`` meaning "cell (r, c) holds d".

Puzzles are made as in OptNet's data set: fill a random valid board, then remove givens in a random
order, keeping a removal only when the puzzle still has exactly one solution (checked by a small
backtracking solver that stops at the second solution). Without a cap on the number of blanks this
yields minimal puzzles (no given can be removed).

    python examples/sudoku/data.py --box 2 --count 5      # print a few puzzles and their solutions
"""
from __future__ import annotations

import argparse
import random
from typing import NamedTuple, Optional

import numpy as np
import torch


class SudokuData(NamedTuple):
    """A data set of puzzles and their unique solutions.

    Attributes:
        puzzles: (B, N, N, N) float64 one-hot givens, blanks all-zero.
        solutions: (B, N, N, N) float64 one-hot solved boards.
    """

    puzzles: torch.Tensor
    solutions: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Backtracking solver on bitmasks (small and fast enough in pure Python for 4x4 and 9x9).
# ----------------------------------------------------------------------------------------------

def _box_index(n: int) -> list[list[int]]:
    N = n * n
    return [[(r // n) * n + c // n for c in range(N)] for r in range(N)]


def _masks(board: list[list[int]], n: int):
    """Bitmasks of the digits used in each row, column and box; None when a given repeats."""
    N = n * n
    box = _box_index(n)
    rows, cols, boxes = [0] * N, [0] * N, [0] * N
    for r in range(N):
        for c in range(N):
            d = board[r][c]
            if d:
                bit = 1 << (d - 1)
                if rows[r] & bit or cols[c] & bit or boxes[box[r][c]] & bit:
                    return None
                rows[r] |= bit
                cols[c] |= bit
                boxes[box[r][c]] |= bit
    return rows, cols, boxes


def solve_board(board, n: int, limit: int = 2, rng: Optional[random.Random] = None) -> list:
    """Up to ``limit`` solutions of a puzzle, by depth-first search.

    Args:
        board: N x N nested lists (or array) of ints, 0 for a blank.
        n: box size.
        limit: stop after this many solutions (2 suffices to decide uniqueness).
        rng: when given, digits are tried in a random order (used to draw random full boards).

    Returns:
        A list of at most ``limit`` solved boards (N x N nested lists).
    """
    N = n * n
    grid = [list(map(int, row)) for row in board]
    masks = _masks(grid, n)
    if masks is None:
        return []
    rows, cols, boxes = masks
    box = _box_index(n)
    full = (1 << N) - 1
    blanks = [(r, c) for r in range(N) for c in range(N) if grid[r][c] == 0]
    out: list = []

    def search() -> bool:
        # Most-constrained blank first: far fewer nodes than row-major order on 9x9 puzzles.
        best, best_free, best_count = -1, 0, N + 1
        for i, (r, c) in enumerate(blanks):
            if grid[r][c]:
                continue
            free = full & ~(rows[r] | cols[c] | boxes[box[r][c]])
            count = bin(free).count("1")
            if count < best_count:
                best, best_free, best_count = i, free, count
                if count <= 1:
                    break
        if best < 0:
            out.append([row[:] for row in grid])
            return len(out) >= limit
        r, c = blanks[best]
        digits = [d for d in range(1, N + 1) if best_free >> (d - 1) & 1]
        if rng is not None:
            rng.shuffle(digits)
        k = box[r][c]
        for d in digits:
            bit = 1 << (d - 1)
            grid[r][c] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[k] |= bit
            if search():
                return True
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[k] &= ~bit
            grid[r][c] = 0
        return False

    search()
    return out


def count_solutions(board, n: int, limit: int = 2) -> int:
    """Number of solutions of a puzzle, counted up to ``limit``."""
    return len(solve_board(board, n, limit=limit))


def random_full_board(n: int, rng: random.Random) -> list[list[int]]:
    """A uniformly-seeded random valid N x N board (randomized backtracking from an empty grid)."""
    N = n * n
    return solve_board([[0] * N for _ in range(N)], n, limit=1, rng=rng)[0]


def make_puzzle(solution: list[list[int]], n: int, rng: random.Random,
                max_blanks: Optional[int] = None) -> list[list[int]]:
    """Blank givens of ``solution`` in random order while the puzzle keeps a unique solution.

    Args:
        solution: a full valid board.
        n: box size.
        rng: the random source.
        max_blanks: stop after this many blanks (None: go on until no given can be removed).

    Returns:
        The puzzle, N x N nested lists with 0 for blanks; its only solution is ``solution``.
    """
    N = n * n
    puzzle = [row[:] for row in solution]
    cells = [(r, c) for r in range(N) for c in range(N)]
    rng.shuffle(cells)
    blanks = 0
    for r, c in cells:
        if max_blanks is not None and blanks >= max_blanks:
            break
        keep = puzzle[r][c]
        puzzle[r][c] = 0
        if count_solutions(puzzle, n, limit=2) == 1:
            blanks += 1
        else:
            puzzle[r][c] = keep  # this given is needed for uniqueness
    return puzzle


# ----------------------------------------------------------------------------------------------
# Tensors: one-hot encoding, data set, rule checks.
# ----------------------------------------------------------------------------------------------

def one_hot(boards: torch.Tensor, n: int) -> torch.Tensor:
    """(..., N, N) int boards (0 = blank) -> (..., N, N, N) float64 one-hot, blanks all-zero."""
    N = n * n
    boards = torch.as_tensor(boards, dtype=torch.long)
    # Index 0 of an (N+1)-wide one-hot is the blank: drop it.
    return torch.nn.functional.one_hot(boards, N + 1)[..., 1:].to(torch.float64)


def generate(count: int, n: int = 2, seed: int = 0, max_blanks: Optional[int] = None) -> SudokuData:
    """``count`` puzzles with unique solutions, reproducible from ``seed``.

    Args:
        count: number of puzzles B.
        n: box size (2: 4x4 boards, 3: 9x9).
        seed: seed of the random source (same seed, same data).
        max_blanks: cap on the blanks of each puzzle (None: minimal puzzles).

    Returns:
        :class:`SudokuData` with puzzles and solutions of shape (B, N, N, N).
    """
    rng = random.Random(seed)
    puzzles, solutions = [], []
    for _ in range(count):
        solution = random_full_board(n, rng)
        puzzles.append(make_puzzle(solution, n, rng, max_blanks))
        solutions.append(solution)
    return SudokuData(one_hot(torch.tensor(puzzles), n), one_hot(torch.tensor(solutions), n))


def load_or_generate(count: int, n: int, seed: int, cache_dir: Optional[str] = None,
                     max_blanks: Optional[int] = None) -> SudokuData:
    """:func:`generate`, memoized as a .pt file in ``cache_dir`` (regenerated when absent)."""
    if cache_dir is None:
        return generate(count, n, seed, max_blanks)
    import os
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"sudoku_n{n}_count{count}_seed{seed}_blanks{max_blanks}.pt")
    if os.path.exists(path):
        saved = torch.load(path)
        return SudokuData(saved["puzzles"], saved["solutions"])
    data = generate(count, n, seed, max_blanks)
    torch.save({"puzzles": data.puzzles, "solutions": data.solutions}, path)
    return data


def decode(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N^3) or (B, N, N, N) scores -> (B, N, N) int boards, the argmax digit (1..N) of each cell."""
    N = n * n
    return x.reshape(-1, N, N, N).argmax(-1) + 1


def board_errors(boards: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, N) int boards (digits 1..N) -> (B,) bool: True where some row, column or box repeats a digit."""
    N = n * n
    B = boards.shape[0]
    onehot = torch.nn.functional.one_hot(boards.long() - 1, N)  # (B, r, c, d)
    row_counts = onehot.sum(2)  # (B, r, d)
    col_counts = onehot.sum(1)  # (B, c, d)
    box_counts = onehot.reshape(B, n, n, n, n, N).sum((2, 4))  # (B, box row, box col, d)
    bad = (row_counts != 1).flatten(1).any(1) | (col_counts != 1).flatten(1).any(1)
    return bad | (box_counts != 1).flatten(1).any(1)


def sudoku_constraints(n: int, full_rank: bool = True) -> torch.Tensor:
    """The Sudoku rules as equality rows ``A x = 1`` over the N^3 one-hot variables.

    Rows: each cell holds one digit, each digit once per row, per column and per box (4 N^2 rows).
    They are linearly dependent; with ``full_rank`` a maximal independent subset is kept, greedily
    in that order, which is the row count OptNet learns (40 rows for 4x4, 247 for 9x9).

    Returns:
        (p, N^3) float64.
    """
    N = n * n

    def var(r, c, d):
        return (r * N + c) * N + d

    rows = []
    groups = ([[var(r, c, d) for d in range(N)] for r in range(N) for c in range(N)]
              + [[var(r, c, d) for c in range(N)] for r in range(N) for d in range(N)]
              + [[var(r, c, d) for r in range(N)] for c in range(N) for d in range(N)]
              + [[var(br * n + i, bc * n + j, d) for i in range(n) for j in range(n)]
                 for br in range(n) for bc in range(n) for d in range(N)])
    for group in groups:
        row = np.zeros(N ** 3)
        row[group] = 1.0
        rows.append(row)
    A = np.array(rows)
    if full_rank:
        # Greedy selection by Gram-Schmidt: keep a row when it adds a new direction.
        basis: list[np.ndarray] = []
        keep = []
        for i, row in enumerate(A):
            v = row.copy()
            for q in basis:
                v -= (q @ v) * q
            if np.linalg.norm(v) > 1e-8:
                basis.append(v / np.linalg.norm(v))
                keep.append(i)
        A = A[keep]
    return torch.from_numpy(A)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box", type=int, default=2, help="box size n (2: 4x4 boards, 3: 9x9)")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = generate(args.count, args.box, args.seed)
    for puzzle, solution in zip(data.puzzles, data.solutions):
        p = (puzzle.argmax(-1) + 1) * (puzzle.sum(-1) > 0)
        s = solution.argmax(-1) + 1
        for pr, sr in zip(p.tolist(), s.tolist()):
            print(" ".join(str(d) if d else "." for d in pr), "   ", " ".join(map(str, sr)))
        print()


if __name__ == "__main__":
    main()
