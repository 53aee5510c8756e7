/* The node-wide maps the orchestrator owns: the ipcache and conntrack.
 *
 * No programs: the orchestrator loads this object first, so the maps are
 * created and pinned under globals/ from their one definition (the headers)
 * before any object that uses them is loaded. It writes the ipcache and
 * collects expired conntrack entries; the objects read and update them.
 */
#define WEIR_NO_PROGRAMS
#include "weir/ipcache.h"
#include "weir/conntrack.h"

char LICENSE[] SEC("license") = "GPL";
