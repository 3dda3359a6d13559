/* Sequentially consistent operations on the load page the primary and a
 * worker share.  The nudge handshake (see LoadPage in dispatch.pyx) needs
 * store-then-load ordering on both sides, which plain accesses do not give. */
#ifndef CYDISPATCH_ATOMICS_H
#define CYDISPATCH_ATOMICS_H
#include <stdint.h>

static inline uint32_t atomic_load_u32(uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
static inline void atomic_store_u32(uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
static inline uint32_t atomic_exchange_u32(uint32_t *p, uint32_t v) {
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
static inline uint32_t atomic_add_u32(uint32_t *p, uint32_t v) {
    return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST);
}
static inline uint32_t atomic_sub_u32(uint32_t *p, uint32_t v) {
    return __atomic_sub_fetch(p, v, __ATOMIC_SEQ_CST);
}
/* 1 if *p held `expected` and now holds `desired`, else 0 (unchanged). */
static inline int atomic_cas_u32(uint32_t *p, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
/* The duration histogram's counters (LoadPage.durations): the worker is
 * their only writer, the primary reads them at a scrape.  Whole 64-bit
 * loads and stores are all either needs, so no ordering is asked for. */
static inline uint64_t relaxed_load_u64(uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void relaxed_store_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
#endif
