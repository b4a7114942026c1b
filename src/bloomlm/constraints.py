"""Constraints for constrained beam search (`generate(constraints=[...])` or `force_words_ids=`).

Framework-free: a constraint is a small state machine over token ids, with transformers 4.37's
interface and semantics (`advance`, `does_advance`, `update`, `reset`, `remaining`, `copy`,
`seqlen`, `completed`), so transformers' own `PhrasalConstraint` / `DisjunctiveConstraint`
objects work wherever these do, and these wherever transformers' do.

    PhrasalConstraint([5, 9, 2])            the phrase 5 9 2 must appear
    DisjunctiveConstraint([[5, 9], [7]])    one of the phrases 5 9 or 7 must appear
    ConstraintListState(constraints)        a hypothesis' progress through all of them

Two behaviours are kept from transformers because they change which beams survive, and so the
ids: a phrase broken midway restarts from scratch (the token that broke it does not start it
again), and a stateful copy of a disjunctive constraint shares its matched prefix with the
original (`copy(stateful=True)`), so advancing the copy advances the original too.
"""

from __future__ import annotations

from typing import Any


def _check_ids(token_ids: Any, name: str) -> None:
    if not isinstance(token_ids, list) or len(token_ids) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of token ids >= 0, got {token_ids!r}")
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in token_ids):
        raise ValueError(f"`{name}` must hold token ids (ints >= 0), got {token_ids!r}")


def _check_token(token_id: Any) -> None:
    if not isinstance(token_id, int):
        raise ValueError(f"`token_id` must be an int, got {token_id!r} ({type(token_id).__name__})")


class Constraint:
    """The interface constrained beam search drives; subclasses implement every method."""

    seqlen: int
    completed: bool

    def advance(self) -> int | list[int] | None:
        """The token(s) that would make progress now (None when completed)."""
        raise NotImplementedError

    def does_advance(self, token_id: int) -> bool:
        raise NotImplementedError

    def update(self, token_id: int) -> tuple[bool, bool, bool]:
        """Feed one token: (stepped, completed, reset)."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def remaining(self) -> int:
        """Tokens still needed to complete."""
        raise NotImplementedError

    def copy(self, stateful: bool = False) -> Constraint:
        raise NotImplementedError


class PhrasalConstraint(Constraint):
    """The tokens `token_ids` must appear in this order, back to back."""

    def __init__(self, token_ids: list[int]):
        _check_ids(token_ids, "token_ids")
        self.token_ids = token_ids
        self.seqlen = len(token_ids)
        self.fulfilled_idx = -1  # the last matched position
        self.completed = False

    def advance(self) -> int | None:
        return None if self.completed else self.token_ids[self.fulfilled_idx + 1]

    def does_advance(self, token_id: int) -> bool:
        _check_token(token_id)
        return not self.completed and token_id == self.token_ids[self.fulfilled_idx + 1]

    def update(self, token_id: int) -> tuple[bool, bool, bool]:
        _check_token(token_id)
        if not self.does_advance(token_id):
            self.reset()
            return False, False, True
        self.fulfilled_idx += 1
        self.completed = self.fulfilled_idx == self.seqlen - 1
        return True, self.completed, False

    def reset(self) -> None:
        # transformers 4.37 resets to 0, not -1; ConstraintListState replaces a reset phrase by a
        # fresh copy, so the value is never read there.
        self.completed = False
        self.fulfilled_idx = 0

    def remaining(self) -> int:
        return self.seqlen - (self.fulfilled_idx + 1)

    def copy(self, stateful: bool = False) -> PhrasalConstraint:
        new = PhrasalConstraint(self.token_ids)
        if stateful:
            new.fulfilled_idx, new.completed = self.fulfilled_idx, self.completed
        return new


class DisjunctiveConstraint(Constraint):
    """One of the phrases `nested_token_ids` must appear (none may be a prefix of another)."""

    def __init__(self, nested_token_ids: list[list[int]]):
        if not isinstance(nested_token_ids, list) or len(nested_token_ids) == 0:
            raise ValueError(
                f"`nested_token_ids` must be a non-empty list of lists, got {nested_token_ids!r}"
            )
        for token_ids in nested_token_ids:
            _check_ids(token_ids, "nested_token_ids")
        self.trie = _build_trie(nested_token_ids)
        self.token_ids = nested_token_ids
        self.seqlen = max(len(token_ids) for token_ids in nested_token_ids)
        self.current_seq: list[int] = []
        self.completed = False

    def _next_tokens(self) -> list[int]:
        node = self.trie
        for token in self.current_seq:
            node = node[token]
        return list(node)

    def advance(self) -> list[int] | None:
        return self._next_tokens() or None

    def does_advance(self, token_id: int) -> bool:
        _check_token(token_id)
        return token_id in self._next_tokens()

    def update(self, token_id: int) -> tuple[bool, bool, bool]:
        _check_token(token_id)
        stepped = self.does_advance(token_id)
        if stepped:
            self.current_seq.append(token_id)  # in place: a stateful copy shares this list
        else:
            self.reset()
        self.completed = not self._next_tokens()  # a leaf: one phrase is complete
        return stepped, self.completed, not stepped

    def reset(self) -> None:
        self.completed = False
        self.current_seq = []

    def remaining(self) -> int:
        return 0 if self.completed else self.seqlen - len(self.current_seq)

    def copy(self, stateful: bool = False) -> DisjunctiveConstraint:
        new = DisjunctiveConstraint(self.token_ids)
        if stateful:
            new.current_seq, new.completed = self.current_seq, self.completed  # shared, see above
        return new


def _build_trie(nested_token_ids: list[list[int]]) -> dict:
    root: dict = {}
    for token_ids in nested_token_ids:
        node = root
        for token in token_ids:
            node = node.setdefault(token, {})

    def leaves(node: dict) -> int:
        return sum(leaves(child) for child in node.values()) if node else 1

    if leaves(root) != len(nested_token_ids):
        raise ValueError(
            "no phrase of a DisjunctiveConstraint may be a prefix of another (or repeat one), "
            f"got {nested_token_ids!r}"
        )
    return root


class ConstraintListState:
    """One hypothesis' progress through every constraint: completed ones, at most one in
    progress, and the pending rest. `get_bank()` ranks hypotheses by progress."""

    def __init__(self, constraints: list[Any]):
        self.constraints = constraints
        self.max_seqlen = max(c.seqlen for c in constraints)
        self.n_constraints = len(constraints)
        self.completed = False
        self.init_state()

    def init_state(self) -> None:
        self.complete_constraints: list[Any] = []
        self.inprogress_constraint: Any = None
        self.pending_constraints = [c.copy(stateful=False) for c in self.constraints]

    def get_bank(self) -> int:
        progress = 0
        if self.inprogress_constraint:
            progress = self.max_seqlen - self.inprogress_constraint.remaining()
        return len(self.complete_constraints) * self.max_seqlen + progress

    def advance(self) -> list[int] | None:
        """Every token that makes progress on some constraint (None when there is none)."""
        sources = self.pending_constraints
        if self.inprogress_constraint is not None:
            sources = [self.inprogress_constraint]
        tokens: list[int] = []
        for constraint in sources:
            advance = constraint.advance()
            if isinstance(advance, int):
                tokens.append(advance)
            elif isinstance(advance, list):
                tokens.extend(advance)
        return tokens or None

    def reset(self, token_ids: list[int] | None) -> None:
        """Start over and feed `token_ids` (a whole sequence, prompt included)."""
        self.init_state()
        for token in token_ids or ():
            self.add(token)
            if self.completed:
                break

    def add(self, token_id: int) -> tuple[bool, bool]:
        """Feed one token: (completed a constraint, stepped)."""
        _check_token(token_id)
        if self.completed:
            return True, False
        if self.inprogress_constraint is not None:
            return self._add_in_progress(token_id)
        for index, pending in enumerate(self.pending_constraints):
            if not pending.does_advance(token_id):
                continue
            stepped, complete, _ = pending.update(token_id)
            if not stepped:
                raise ValueError(
                    f"{type(pending).__name__}.update() made no progress although "
                    "does_advance() was true"
                )
            if complete:
                self.complete_constraints.append(pending)
            else:
                self.inprogress_constraint = pending
            del self.pending_constraints[index]
            if not self.pending_constraints and self.inprogress_constraint is None:
                self.completed = True
            return complete, stepped  # one token steps through one constraint at most
        return False, False

    def _add_in_progress(self, token_id: int) -> tuple[bool, bool]:
        constraint = self.inprogress_constraint
        stepped, complete, reset = constraint.update(token_id)
        if reset:  # broken: back to the pending ones, from scratch
            self.pending_constraints.append(constraint.copy(stateful=False))
            self.inprogress_constraint = None
        if complete:
            self.complete_constraints.append(constraint)
            self.inprogress_constraint = None
            if not self.pending_constraints:
                self.completed = True
        return complete, stepped

    def copy(self, stateful: bool = True) -> ConstraintListState:
        new = ConstraintListState(self.constraints)
        if stateful:
            new.complete_constraints = [c.copy(stateful=True) for c in self.complete_constraints]
            if self.inprogress_constraint is not None:
                new.inprogress_constraint = self.inprogress_constraint.copy(stateful=True)
            new.pending_constraints = [c.copy() for c in self.pending_constraints]
        return new


def constraints_from_force_words(force_words_ids: Any) -> list[Constraint]:
    """`force_words_ids` as constraints: a list of ids is a phrase, a list of lists of ids a
    choice between phrases (transformers' rule)."""
    message = (
        "`force_words_ids` must be a non-empty list of phrases (lists of token ids >= 0) or of "
        f"choices (lists of such lists), got {force_words_ids!r}"
    )
    if not isinstance(force_words_ids, list) or len(force_words_ids) == 0:
        raise ValueError(message)
    constraints: list[Constraint] = []
    for word_ids in force_words_ids:
        if not isinstance(word_ids, list) or len(word_ids) == 0:
            raise ValueError(message)
        nested = isinstance(word_ids[0], list)
        constraints.append(
            DisjunctiveConstraint(word_ids) if nested else PhrasalConstraint(word_ids)
        )
    return constraints


__all__ = [
    "Constraint",
    "ConstraintListState",
    "DisjunctiveConstraint",
    "PhrasalConstraint",
    "constraints_from_force_words",
]
