"""Per-layer KV storage with per-head eviction: slots, positions, validity and compaction.

Layout. Keys and values live in preallocated buffers of shape (batch, num_kv_heads, capacity,
head_dim); the first `length` slots are in use. Each slot carries the token's logical position
(`positions`, int64): the number of valid (non-padding) tokens before it in its row, which is also
the RoPE position `generate` gives it. Padding slots and the unused tail of a shorter row carry
position -1 and are never attended. Policies keep extra per-slot state in `fields` (float
tensors of shape (batch, num_kv_heads, capacity)); eviction gathers them together with the keys.

Life of a forward pass (driven by trimkv.cache.attention):
1. `update` appends the new keys and values and returns every stored slot. It never evicts, so
   the current queries see every token the previous step kept plus the new ones.
2. `register_new_tokens` marks the new slots valid or padding from the 2D attention mask and
   assigns their logical positions.
3. The attention function attends with a mask built from `positions`, lets the policy observe
   what it needs, then calls `evict`.
4. `evict` runs per batch row: a row whose valid slot count reached budget + max(buffer, 1) is cut
   back to `budget` slots per KV head, keeping the policy's highest-scoring slots in their
   original order. Other rows keep all their valid slots.

Per-row triggering makes every row of a left-padded batch follow exactly the schedule it would
follow alone, because a row's counts ignore padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicLayer

from trimkv.compat import query_length_from_mask_size_argument

if TYPE_CHECKING:
    from trimkv.policies.base import Policy

# Capacity is grown in steps of this many slots when a layer without eviction fills up, so a
# long decode with the full cache reallocates once every GROWTH_SLOTS tokens, not every step.
GROWTH_SLOTS = 256


class EvictionLayer(DynamicLayer):
    """KV storage of one decoder layer, bounded to `budget` tokens per KV head.

    Args:
        layer_idx: index of the decoder layer.
        policy: the scoring policy shared by all layers (state lives on the layer).
        budget: tokens kept per KV head after an eviction; None disables eviction.
        buffer: extra tokens allowed before an eviction runs (0 evicts every step).
        record_history: when True, `history` stores the kept positions after every forward.
    """

    is_croppable = False

    def __init__(
        self,
        layer_idx: int,
        policy: "Policy",
        budget: int | None,
        buffer: int = 0,
        record_history: bool = False,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.policy = policy
        self.budget = budget
        self.buffer = buffer
        self.record_history = record_history

        self.length = 0  # slots in use
        self.seen = 0  # tokens fed, padding included (what DynamicCache would report)
        self.pending = 0  # tokens appended by `update` and not yet registered by the attention function
        self.capacity = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (batch, kv_heads, capacity) int64, -1 = empty
        self.fields: dict[str, torch.Tensor] = {}
        self.state: dict[str, Any] = {}  # policy state that is not per slot (e.g. a query window)
        self.valid_seen: torch.Tensor | None = None  # (batch,) valid tokens fed per row
        self.valid_stored: torch.Tensor | None = None  # (batch,) valid tokens held per row and head
        self.stored_bound = 0  # host-side upper bound of valid_stored.max(), saves a sync per step
        self.new_positions: torch.Tensor | None = None  # (batch, q) logical positions of the current queries, -1 = pad
        self.has_invalid_slots = False  # host flag: some slot in [0, length) is empty or padding

        # Statistics for metrics and tests.
        self.evictions = 0
        self.peak_slots = 0  # max slots held while attending (before eviction)
        self.peak_retained = 0  # max slots held after a forward pass (after eviction)
        self.forward_steps = 0
        # Benchmark instrumentation: with `timing` on, the attention function adds the time spent
        # in policy work (statistics, scoring, eviction) to `policy_seconds`.
        self.timing = False
        self.policy_seconds = 0.0
        self.retained_sum: torch.Tensor | None = None  # (batch,) real tokens held, summed over forwards
        self.retained_peak: torch.Tensor | None = None  # (batch,) max real tokens held after a forward
        self.history: list[torch.Tensor] = []

    # ------------------------------------------------------------------ transformers protocol

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        batch = key_states.shape[0]
        self.valid_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.valid_stored = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new states (batch, kv_heads, q, head_dim) and return all stored slots."""
        if self.pending:
            raise RuntimeError(
                f"layer {self.layer_idx}: the eviction cache was updated twice without attention in between; "
                "the model must run with a trimkv attention implementation (use trimkv.enable_eviction(model))"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)

        query_length = key_states.shape[2]
        self._ensure_capacity(self.length + query_length, key_states, value_states)
        end = self.length + query_length
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.positions[:, :, self.length : end] = -1
        for tensor in self.fields.values():
            tensor[:, :, self.length : end] = 0
        self.length = end
        self.seen += query_length
        self.pending = query_length
        self.peak_slots = max(self.peak_slots, self.length)
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        # Tokens fed, never tokens stored: transformers derives default positions, mask offsets
        # and generate's continuation slicing from this number.
        return self.seen

    def get_mask_sizes(self, query_length: int | torch.Tensor, *args) -> tuple[int, int]:
        # The pass-through mask function ignores these sizes; they only have to be consistent.
        return self.length + query_length_from_mask_size_argument(query_length), 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the transformers 5.2 name of get_max_length
        return -1

    def crop(self, *args, **kwargs) -> None:
        raise NotImplementedError("an eviction cache cannot be cropped: evicted tokens are gone")

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.policy, self.budget, self.buffer, self.record_history)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.key_buffer = self.key_buffer[indices]
        self.value_buffer = self.value_buffer[indices]
        self.positions = self.positions[indices]
        self.fields = {name: tensor[indices] for name, tensor in self.fields.items()}
        self.valid_seen = self.valid_seen[indices]
        self.valid_stored = self.valid_stored[indices]
        if self.retained_sum is not None:
            self.retained_sum = self.retained_sum[indices]
            self.retained_peak = self.retained_peak[indices]
        self.state = {name: value[indices] if torch.is_tensor(value) else value for name, value in self.state.items()}
        self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        index = torch.arange(self.key_buffer.shape[0], device=self.device).repeat_interleave(repeats)
        self.batch_select_indices(index)

    def reset_peak_stats(self) -> None:
        """Restart the `peak_slots` and `peak_retained` maxima from the slots in use now."""
        self.peak_slots = self.length
        self.peak_retained = self.length

    # ------------------------------------------------------------------ storage

    def add_field(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Create (once) a per-slot policy field and return it."""
        if name not in self.fields:
            shape = (self.key_buffer.shape[0], self.key_buffer.shape[1], self.capacity)
            self.fields[name] = torch.zeros(shape, dtype=dtype, device=self.device)
        return self.fields[name]

    def field(self, name: str) -> torch.Tensor:
        """Return the used part (batch, kv_heads, length) of a per-slot field."""
        return self.fields[name][:, :, : self.length]

    @property
    def slot_positions(self) -> torch.Tensor:
        """Logical positions of the used slots, (batch, kv_heads, length); -1 marks an empty slot."""
        return self.positions[:, :, : self.length]

    def _ensure_capacity(self, needed: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        if needed <= self.capacity:
            return
        if self.budget is not None:
            # An evicting layer keeps at most budget + buffer slots between forwards, so size for
            # that once and avoid regrowing every decode step.
            new_capacity = max(needed, self._steady_capacity())
        else:
            new_capacity = max(needed, self.capacity + GROWTH_SLOTS)
        self._resize(new_capacity, key_like, value_like)

    def _steady_capacity(self) -> int:
        return self.budget + max(self.buffer, 1)

    def _resize(self, new_capacity: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """Reallocate every per-slot buffer to `new_capacity` slots, keeping the used ones."""
        batch, heads, _, head_dim = key_like.shape
        # Unused slots must hold finite numbers: SDPA multiplies masked-out values by zero, and
        # 0 * NaN would leak into the output.
        key_buffer = key_like.new_zeros(batch, heads, new_capacity, head_dim)
        value_buffer = value_like.new_zeros(batch, heads, new_capacity, value_like.shape[-1])
        positions = torch.full((batch, heads, new_capacity), -1, dtype=torch.long, device=key_like.device)
        if self.length:
            key_buffer[:, :, : self.length] = self.key_buffer[:, :, : self.length]
            value_buffer[:, :, : self.length] = self.value_buffer[:, :, : self.length]
            positions[:, :, : self.length] = self.positions[:, :, : self.length]
        fields = {}
        for name, tensor in self.fields.items():
            resized = tensor.new_zeros(batch, heads, new_capacity)
            resized[:, :, : self.length] = tensor[:, :, : self.length]
            fields[name] = resized
        self.key_buffer, self.value_buffer, self.positions, self.fields = key_buffer, value_buffer, positions, fields
        self.capacity = new_capacity

    def _refresh_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    # ------------------------------------------------------------------ per-step bookkeeping

    def register_new_tokens(self, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Mark the pending slots valid or padding and assign their logical positions.

        Args:
            padding_mask: the 2D mask handed to the attention function, bool (batch, >= q) with
                True for real tokens; only its last q columns are read, so later forwards do not
                need the full mask. None means every new token is real.

        Returns:
            The logical positions of the new tokens, (batch, q) int64, -1 for padding.
        """
        query_length = self.pending
        start = self.length - query_length
        batch = self.key_buffer.shape[0]
        self.stored_bound += query_length
        if padding_mask is None:
            # Every new token is real: positions continue from each row's count.
            new_positions = self.valid_seen[:, None] + torch.arange(query_length, device=self.device)
            self.valid_seen += query_length
            self.valid_stored += query_length
        else:
            new_valid = padding_mask[:, -query_length:].to(device=self.device, dtype=torch.bool)
            if new_valid.shape[0] != batch:
                new_valid = new_valid.expand(batch, -1)
            new_positions = self.valid_seen[:, None] + new_valid.long().cumsum(dim=1) - 1
            new_positions = new_positions.masked_fill(~new_valid, -1)
            new_counts = new_valid.sum(dim=1)
            self.valid_seen += new_counts
            self.valid_stored += new_counts
            if not self.has_invalid_slots:
                self.has_invalid_slots = bool((~new_valid).any())

        self.positions[:, :, start : self.length] = new_positions[:, None, :]
        self.new_positions = new_positions
        self.pending = 0
        return new_positions

    def visibility_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """Which stored slot each new query may attend to, bool (batch, kv_heads, q, length).

        A query may attend to a slot that contains a real token at or before the query's position
        (and within `sliding_window` of it, when set). Padding queries attend to every slot, which keeps
        their outputs finite; nothing downstream reads them.
        """
        slot_positions = self.slot_positions[:, :, None, :]
        query_positions = self.new_positions[:, None, :, None]
        mask = (slot_positions >= 0) & (slot_positions <= query_positions)
        if sliding_window is not None:
            mask &= slot_positions > query_positions - sliding_window
        mask |= query_positions < 0
        return mask

    def needs_eviction(self) -> torch.Tensor | None:
        """Rows that must evict now, bool (batch,), or None when no row must."""
        if self.budget is None or not self.policy.evicts:
            return None
        threshold = self.budget + max(self.buffer, 1)
        if self.stored_bound < threshold:
            # No row can have reached the threshold: skip the device-to-host sync.
            return None
        triggered = self.valid_stored >= threshold
        if not bool(triggered.any()):
            self.stored_bound = int(self.valid_stored.max())
            return None
        return triggered

    def evict(self) -> None:
        """Cut every triggered row back to `budget` slots per KV head and compact the buffers."""
        triggered = self.needs_eviction()
        if triggered is not None:
            valid = self.slot_positions >= 0
            # Any real slot must outrank every empty one, even when a policy scores it -inf.
            lowest = torch.finfo(torch.float32).min
            scores = torch.nan_to_num(self.policy.score(self).float(), nan=lowest, neginf=lowest)
            scores = scores.masked_fill(~valid, float("-inf"))
            # A stable sort breaks exact ties (common after max pooling) in favour of the earlier
            # slot, so a padded row and the same prompt alone keep the same tokens.
            top = scores.sort(dim=-1, descending=True, stable=True).indices[..., : self.budget]
            keep = torch.zeros_like(valid)
            keep.scatter_(-1, top, True)
            keep &= valid
            keep = torch.where(triggered[:, None, None], keep, valid)
            self._compact(keep)
            self.valid_stored = torch.where(triggered, torch.full_like(self.valid_stored, self.budget), self.valid_stored)
            self.stored_bound = int(self.valid_stored.max())
            self.evictions += 1
        self.peak_retained = max(self.peak_retained, self.length)
        if self.retained_sum is None:
            self.retained_sum = torch.zeros_like(self.valid_stored)
            self.retained_peak = torch.zeros_like(self.valid_stored)
        self.retained_sum += self.valid_stored
        self.retained_peak = torch.maximum(self.retained_peak, self.valid_stored)
        self.forward_steps += 1
        if self.record_history:
            self.history.append(self.slot_positions.clone())

    def _compact(self, keep: torch.Tensor) -> None:
        """Move the kept slots (bool (batch, kv_heads, length)) to the front, in order."""
        kept_counts = keep.sum(dim=-1)  # (batch, kv_heads)
        new_length = int(kept_counts.max())
        destination = keep.long().cumsum(dim=-1) - 1
        # Slots that are not kept write into an overflow column that is dropped afterwards.
        destination = destination.masked_fill(~keep, new_length)
        source = torch.arange(self.length, device=self.device).expand_as(destination)
        index = torch.zeros(*keep.shape[:2], new_length + 1, dtype=torch.long, device=self.device)
        index.scatter_(-1, destination, source)
        index = index[:, :, :new_length]
        filled = torch.arange(new_length, device=self.device) < kept_counts[..., None]

        self.policy.before_compact(self, index, filled)
        head_dim_index = index[..., None]
        new_keys = self.keys.gather(2, head_dim_index.expand(-1, -1, -1, self.key_buffer.shape[-1]))
        new_values = self.values.gather(2, head_dim_index.expand(-1, -1, -1, self.value_buffer.shape[-1]))
        new_positions = self.slot_positions.gather(2, index).masked_fill(~filled, -1)
        new_fields = {name: self.field(name).gather(2, index) for name in self.fields}

        self.key_buffer[:, :, :new_length] = new_keys
        self.value_buffer[:, :, :new_length] = new_values
        self.positions[:, :, :new_length] = new_positions
        self.positions[:, :, new_length : self.length] = -1
        for name, tensor in new_fields.items():
            self.fields[name][:, :, :new_length] = tensor
        self.length = new_length
        self.has_invalid_slots = not bool(filled.all())
        if self.capacity > 2 * self._steady_capacity():
            # A long prompt grew the buffers; release that memory once decoding is bounded.
            self._resize(max(self.length, self._steady_capacity()), self.key_buffer, self.value_buffer)
        self._refresh_views()
        self.policy.after_compact(self)
