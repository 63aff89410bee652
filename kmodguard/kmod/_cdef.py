"""C declarations of the part of libkmod (libkmod.h, kmod >= 25) that kmodguard uses, and the
two calls of libc (POSIX.1-2008 <locale.h>) that run its matching in the C locale.

ABI mode: nothing is compiled at install time; libkmod.so.2 is opened at run time.
"""

CDEF = """
struct kmod_ctx;
struct kmod_module;
struct kmod_list;

enum kmod_resources {  /* what kmod_validate_resources returns: anything but OK means reload */
    KMOD_RESOURCES_OK = 0,
    KMOD_RESOURCES_MUST_RELOAD = 1,
    KMOD_RESOURCES_MUST_RECREATE = 2,
};

struct kmod_ctx *kmod_new(const char *dirname, const char * const *config_paths);
struct kmod_ctx *kmod_unref(struct kmod_ctx *ctx);
int kmod_load_resources(struct kmod_ctx *ctx);
int kmod_validate_resources(struct kmod_ctx *ctx);
void kmod_set_log_priority(struct kmod_ctx *ctx, int priority);
const char *kmod_get_dirname(const struct kmod_ctx *ctx);

struct kmod_list *kmod_list_next(const struct kmod_list *list, const struct kmod_list *curr);

int kmod_module_new_from_lookup(struct kmod_ctx *ctx, const char *given_alias,
                                struct kmod_list **list);
int kmod_module_new_from_name(struct kmod_ctx *ctx, const char *name,
                              struct kmod_module **mod);
int kmod_module_new_from_path(struct kmod_ctx *ctx, const char *path,
                              struct kmod_module **mod);
struct kmod_module *kmod_module_get_module(const struct kmod_list *entry);
struct kmod_module *kmod_module_unref(struct kmod_module *mod);
int kmod_module_unref_list(struct kmod_list *list);
const char *kmod_module_get_name(const struct kmod_module *mod);
const char *kmod_module_get_path(const struct kmod_module *mod);

int kmod_module_get_info(const struct kmod_module *mod, struct kmod_list **list);
const char *kmod_module_info_get_key(const struct kmod_list *entry);
const char *kmod_module_info_get_value(const struct kmod_list *entry);
void kmod_module_info_free_list(struct kmod_list *list);

struct kmod_config_iter;
struct kmod_config_iter *kmod_config_get_blacklists(const struct kmod_ctx *ctx);
const char *kmod_config_iter_get_key(const struct kmod_config_iter *iter);
bool kmod_config_iter_next(struct kmod_config_iter *iter);
void kmod_config_iter_free_iter(struct kmod_config_iter *iter);

int kmod_module_probe_insert_module(struct kmod_module *mod, unsigned int flags,
                                    const char *extra_options,
                                    void *run_install, const void *data,
                                    void *print_action);

/* libc: a thread's own locale, for the duration of one libkmod call */
typedef void *locale_t;
locale_t newlocale(int category_mask, const char *locale, locale_t base);
locale_t uselocale(locale_t newloc);
"""
